//! Secrets by reference: `env:NAME` or `file:PATH`, never inline.
//!
//! A [`Secret`] prints as `Secret(..)` in `Debug`, so a config dump, a panic
//! message or a `tracing` field can never show an upstream key.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::HeaderValue;

/// An upstream credential, resolved at load time. Cheap to clone.
#[derive(Clone)]
pub struct Secret(Arc<SecretInner>);

struct SecretInner {
    value: Box<str>,
    /// The header values made from it, built on first use and shared after:
    /// injecting the credential costs a reference count, not an allocation.
    headers: [OnceLock<Option<HeaderValue>>; 3],
}

/// How a secret is written into a header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderForm {
    /// The value as it is (`X-API-Key: <secret>`).
    Plain,
    /// `Bearer <secret>`.
    Bearer,
    /// `Basic <secret>` (the secret is the base64 `key:secret` pair).
    Basic,
}

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Secret(Arc::new(SecretInner {
            value: value.into(),
            headers: Default::default(),
        }))
    }

    /// The secret value: call only where it is put on the wire to its own upstream.
    pub fn expose(&self) -> &str {
        &self.0.value
    }

    /// The secret as a sensitive header value (never logged by `http`'s
    /// `Debug`, never indexed by HPACK); `None` if it cannot be one.
    pub fn header_value(&self, form: HeaderForm) -> Option<HeaderValue> {
        let (slot, prefix) = match form {
            HeaderForm::Plain => (&self.0.headers[0], ""),
            HeaderForm::Bearer => (&self.0.headers[1], "Bearer "),
            HeaderForm::Basic => (&self.0.headers[2], "Basic "),
        };
        slot.get_or_init(|| {
            let text = format!("{prefix}{}", self.expose());
            let mut value = HeaderValue::from_maybe_shared(Bytes::from(text)).ok()?;
            value.set_sensitive(true);
            Some(value)
        })
        .clone()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Resolves `env:NAME` or `file:PATH` (relative paths are relative to the config
/// file's folder). The error never contains the value, only what was wrong.
pub fn resolve(
    reference: &str,
    config_dir: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    if let Some(name) = reference.strip_prefix("env:") {
        if name.is_empty() {
            return Err("`env:` needs a variable name, as in `env:COMFY_KEY`".into());
        }
        return match env(name) {
            Some(value) if !value.trim().is_empty() => Ok(Secret::new(value.trim())),
            Some(_) => Err(format!("environment variable `{name}` is empty")),
            None => Err(format!("environment variable `{name}` is not set")),
        };
    }
    if let Some(path) = reference.strip_prefix("file:") {
        if path.is_empty() {
            return Err("`file:` needs a path, as in `file:/run/secrets/comfy`".into());
        }
        let path = match config_dir {
            Some(dir) if Path::new(path).is_relative() => dir.join(path),
            _ => Path::new(path).to_path_buf(),
        };
        return match std::fs::read_to_string(&path) {
            // Secret files conventionally end in a newline; it is not part of the key.
            Ok(value) if !value.trim().is_empty() => Ok(Secret::new(value.trim())),
            Ok(_) => Err(format!("secret file `{}` is empty", path.display())),
            Err(error) => Err(format!(
                "cannot read secret file `{}`: {error}",
                path.display()
            )),
        };
    }
    Err("inline secrets are not allowed: use `env:NAME` or `file:PATH`".into())
}

/// Checks that `reference` is a well-formed `env:`/`file:` reference without reading it.
/// The placeholder it returns is never sent anywhere: `FormOnly` configs are not served.
pub fn check_form(reference: &str) -> Result<Secret, String> {
    match reference.split_once(':') {
        Some(("env" | "file", rest)) if !rest.is_empty() => Ok(Secret::new("unresolved")),
        Some(("env" | "file", _)) => {
            Err("the reference needs a name or path after the colon".into())
        }
        _ => Err("inline secrets are not allowed: use `env:NAME` or `file:PATH`".into()),
    }
}

/// Refuses a key that cannot travel in an HTTP header (control characters, non-ASCII).
pub fn header_safe(secret: Secret) -> Result<Secret, String> {
    if secret.expose().bytes().all(|b| (0x21..0x7f).contains(&b)) {
        Ok(secret)
    } else {
        Err("the key contains characters that cannot be sent in an HTTP header".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("k-123\n".into()),
            "BLANK" => Some("  ".into()),
            _ => None,
        }
    }

    #[test]
    fn env_references_resolve_and_are_trimmed() {
        assert_eq!(resolve("env:SET", None, &env).unwrap().expose(), "k-123");
    }

    #[test]
    fn missing_empty_and_inline_secrets_are_refused_without_echoing_the_value() {
        assert!(
            resolve("env:NOPE", None, &env)
                .unwrap_err()
                .contains("not set")
        );
        assert!(
            resolve("env:BLANK", None, &env)
                .unwrap_err()
                .contains("empty")
        );
        let inline = resolve("sk-live-abcdef", None, &env).unwrap_err();
        assert!(inline.contains("inline secrets are not allowed"));
        assert!(!inline.contains("sk-live-abcdef"));
    }

    #[test]
    fn file_references_are_read_relative_to_the_config() {
        let dir = std::env::temp_dir().join(format!("teamgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comfy.key"), "file-key\n").unwrap();
        assert_eq!(
            resolve("file:comfy.key", Some(&dir), &env)
                .unwrap()
                .expose(),
            "file-key"
        );
        assert!(
            resolve("file:missing.key", Some(&dir), &env)
                .unwrap_err()
                .contains("cannot read")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_never_shows_the_value() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(..)");
    }
}
