//! The TLS material of `amqps://` connections, as PEM files, shared by the
//! relay and the consumer (each hands it to its AMQP client): the roots to
//! trust beside the system's, and an optional client certificate.

use std::path::PathBuf;

/// Where an `amqps://` connection's certificates are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpTls {
    /// CA certificates (PEM) to trust besides the system's roots: for a
    /// broker whose certificate your own CA signed.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM, chain allowed), for brokers that ask for
    /// one; with [`AmqpTls::client_key_file`].
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, PKCS#8 or RSA or SEC1).
    pub client_key_file: Option<PathBuf>,
}

/// The files' contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpTlsPem {
    /// The CA certificates, PEM text.
    pub ca: Option<String>,
    /// The client certificate and key, PEM bytes.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl AmqpTls {
    /// Checks the settings go together; the error names the field.
    ///
    /// # Errors
    ///
    /// A client certificate without its key, or the reverse.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => Err("a client certificate needs its key file".into()),
            (None, Some(_)) => Err("a client key needs its certificate file".into()),
            _ => Ok(()),
        }
    }

    /// Reads the files.
    ///
    /// # Errors
    ///
    /// A file that cannot be read, naming it.
    pub fn load(&self) -> Result<AmqpTlsPem, String> {
        self.validate()?;
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let ca = match &self.ca_file {
            Some(path) => Some(
                String::from_utf8(read(path)?)
                    .map_err(|_| format!("{} is not PEM text", path.display()))?,
            ),
            None => None,
        };
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(AmqpTlsPem { ca, client })
    }
}
