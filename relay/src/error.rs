//! The one error type of the relay crate.

/// What can go wrong running or administering a relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is not acceptable.
    #[error("invalid config {field}: {reason}")]
    Config {
        /// The config field (the binary names the flag and variable).
        field: &'static str,
        /// What is wrong and what it must be.
        reason: String,
    },
    /// Could not connect to the database or broker; the URL is shown without
    /// its password.
    #[error("cannot connect to the {what} at {url}: {cause}")]
    Connect {
        /// `database` or `broker`.
        what: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The underlying error's text.
        cause: String,
    },
    /// A database statement failed.
    #[error("database error while {operation}: {cause}")]
    Database {
        /// What the relay was doing.
        operation: &'static str,
        /// The diesel error.
        cause: diesel::result::Error,
    },
    /// The broker refused or dropped an operation.
    #[error("broker error while {operation}: {cause}")]
    Broker {
        /// What the relay was doing.
        operation: &'static str,
        /// The lapin error.
        cause: lapin::Error,
    },
    /// The outbox tables are missing or older than this relay: the migrations were not applied.
    #[error(
        "the outbox tables in schema {schema} are missing or older than this relay: run `outbox-relay migrate` (or outbox::migrate) first"
    )]
    NotMigrated {
        /// The schema looked in.
        schema: String,
    },
}

/// `Result` with the relay [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn db(operation: &'static str) -> impl FnOnce(diesel::result::Error) -> Error {
        move |cause| Error::Database { operation, cause }
    }

    pub(crate) fn broker(operation: &'static str) -> impl FnOnce(lapin::Error) -> Error {
        move |cause| Error::Broker { operation, cause }
    }
}

// Lets diesel-async's `transaction` report a failed BEGIN or COMMIT.
impl From<diesel::result::Error> for Error {
    fn from(cause: diesel::result::Error) -> Self {
        Error::Database {
            operation: "running a transaction",
            cause,
        }
    }
}
