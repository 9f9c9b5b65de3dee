//! The encrypt stage: age, to X25519 recipients (public keys only: backing up never needs a
//! private key), or none. Restoring and verifying need one of the recipients' identities.

use std::io::{self, Read};

use age::x25519::{Identity, Recipient};

use crate::compress::{Finish, Layer};
use crate::error::BackupError;

/// Parses `age1...` recipients.
pub fn recipients(values: &[String]) -> Result<Vec<Recipient>, BackupError> {
    values
        .iter()
        .map(|value| {
            value.trim().parse::<Recipient>().map_err(|error| {
                BackupError::Refused(format!(
                    "backup recipient {value:?} is not an age X25519 public key (age1...): {error}"
                ))
            })
        })
        .collect()
}

/// Parses identities (`AGE-SECRET-KEY-1...`), one per line of `text`; `#` lines are comments,
/// as in files `age-keygen` writes.
pub fn identities(text: &str) -> Result<Vec<Identity>, BackupError> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            line.parse::<Identity>().map_err(|error| {
                BackupError::Refused(format!(
                    "not an age X25519 identity (AGE-SECRET-KEY-1...): {error}"
                ))
            })
        })
        .collect()
}

/// Wraps `output` so that what is written is encrypted to `recipients` (none: unchanged).
pub fn encrypt(recipients: &[Recipient], output: Box<dyn Finish>) -> io::Result<Box<dyn Finish>> {
    if recipients.is_empty() {
        return Ok(output);
    }
    let encryptor = age::Encryptor::with_recipients(
        recipients
            .iter()
            .map(|recipient| recipient as &dyn age::Recipient),
    )
    .map_err(io::Error::other)?;
    let writer = encryptor.wrap_output(output).map_err(io::Error::other)?;
    Ok(Layer::boxed(writer, |age| age.finish()))
}

/// Wraps `input`, encrypted to one of `identities`' recipients.
pub fn decrypt(
    identities: &[Identity],
    input: Box<dyn Read + Send>,
) -> Result<Box<dyn Read + Send>, String> {
    let decryptor = age::Decryptor::new(input).map_err(|error| error.to_string())?;
    let reader = decryptor
        .decrypt(
            identities
                .iter()
                .map(|identity| identity as &dyn age::Identity),
        )
        .map_err(|error| match error {
            age::DecryptError::NoMatchingKeys => {
                "none of the given identities is a recipient of this backup".to_owned()
            }
            other => other.to_string(),
        })?;
    Ok(Box::new(reader))
}
