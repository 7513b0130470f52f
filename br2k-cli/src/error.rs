//! One-line errors with a cause and a hint, and the exit codes.

use std::fmt;

use br2k_core::{ErrorKind, ServiceId};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage or input, or (`diff --exit-code`) a difference.
pub const EXIT_USAGE: u8 = 2;

/// An error shown to the user as one line: the cause, then a hint.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What went wrong.
    pub cause: String,
    /// What to do about it.
    pub hint: Option<String>,
}

/// Result of a command.
pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    /// A failure (exit 1).
    pub fn fail(cause: impl fmt::Display) -> Self {
        Self {
            code: EXIT_FAILURE,
            cause: cause.to_string(),
            hint: None,
        }
    }

    /// Bad input (exit 2).
    pub fn usage(cause: impl fmt::Display) -> Self {
        Self {
            code: EXIT_USAGE,
            cause: cause.to_string(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl fmt::Display) -> Self {
        self.hint = Some(hint.to_string());
        self
    }

    /// Prefixes the cause with `context`.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.cause = format!("{context}: {}", self.cause);
        self
    }

    /// The core error `e` in words: service keys (`service 0x…`) replaced by the
    /// service name, contract reverts phrased as what they mean, and a hint by kind.
    pub fn from_core(e: &br2k_core::Error, id: Option<&ServiceId>) -> Self {
        let mut cause = e.to_string();
        if let Some(id) = id {
            let key = br2k_chain::service_key(id);
            cause = cause.replace(&format!("service {key}"), &format!("service {id}"));
            cause = cause.replace(&format!("{key}"), id.as_str());
        }
        cause = cause
            .replace(
                " is neither owner nor operator of ",
                " has no operator role for ",
            )
            .replace(" holds no replica role on ", " has no replica role for ")
            .replace(" does not own ", " is not the owner of ");
        let kind = e.kind();
        let (code, hint) = match kind {
            ErrorKind::PermissionDenied => (
                EXIT_FAILURE,
                Some(
                    "ask the service owner to run `br2k grant SERVICE ACCOUNT --role operator`, or use the owner's key (context key_env/key_file)",
                ),
            ),
            ErrorKind::NotFound => (
                EXIT_FAILURE,
                Some(
                    "check the service id and the context (`br2k context show`); `br2k deploy` registers a new service",
                ),
            ),
            ErrorKind::Unavailable => (
                EXIT_FAILURE,
                Some(
                    "is the endpoint up? check the context (`br2k context show`) and retry; nothing was changed by this step",
                ),
            ),
            ErrorKind::Conflict => (
                EXIT_FAILURE,
                Some("read the current record with `br2k status SERVICE`"),
            ),
            ErrorKind::InvalidInput => (EXIT_USAGE, None),
            ErrorKind::Tampered => (
                EXIT_FAILURE,
                Some(
                    "the bytes served differ from their recorded digest; run `br2k image verify` or `br2k recover`",
                ),
            ),
            _ => (EXIT_FAILURE, None),
        };
        Self {
            code,
            cause,
            hint: hint.map(str::to_owned),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.cause.replace('\n', " "))?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl From<br2k_core::Error> for CliError {
    fn from(e: br2k_core::Error) -> Self {
        Self::from_core(&e, None)
    }
}

impl From<br2k_core::ValidationError> for CliError {
    fn from(e: br2k_core::ValidationError) -> Self {
        Self::usage(e)
    }
}

/// Maps a core result into words about service `id`.
pub trait ForService<T> {
    /// The error in words, naming `id` instead of its on-chain key.
    fn for_service(self, id: &ServiceId) -> CliResult<T>;
}

impl<T> ForService<T> for Result<T, br2k_core::Error> {
    fn for_service(self, id: &ServiceId) -> CliResult<T> {
        self.map_err(|e| CliError::from_core(&e, Some(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revert_names_the_service_and_the_missing_role() {
        let id = ServiceId::new("ledger").expect("id");
        let key = br2k_chain::service_key(&id);
        let e = br2k_core::Error::permission_denied(format!(
            "0x70997970c51812dc3a010c7d01b50e0d17dc79c8 is neither owner nor operator of service {key}"
        ));
        let c = CliError::from_core(&e, Some(&id));
        assert_eq!(
            c.cause,
            "permission denied: 0x70997970c51812dc3a010c7d01b50e0d17dc79c8 has no operator role for service ledger"
        );
        assert_eq!(c.code, EXIT_FAILURE);
        let line = c.to_string();
        assert!(
            !line.contains('\n') && line.contains("hint: ask the service owner"),
            "{line}"
        );
    }

    #[test]
    fn invalid_input_is_a_usage_error() {
        let e: br2k_core::Error = br2k_core::ValidationError::spec("replicas", "too many").into();
        assert_eq!(CliError::from_core(&e, None).code, EXIT_USAGE);
    }
}
