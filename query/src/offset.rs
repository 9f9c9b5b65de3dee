//! Offsets: where a query resumes. A position is `(writtenAt, pid, seqNr)`, a total order over
//! the journal (and `(writtenAt, pid, revision)` over durable-state changes). An offset token is
//! a position, encoded; resuming from a token reads strictly after it.
//!
//! Token format (opaque to clients): `"p1."` followed by the URL-safe base64 (no padding) of
//! `writtenAt` (ms, i64 big-endian), `seqNr` (i64 big-endian) and the persistence id's UTF-8.
//! An event delivered from a change stream also carries the change's resume token: `"c1."`,
//! the same base64, `"."`, and the token's hex `_data`, so a resume continues the stream
//! exactly where it was.

use std::cmp::Ordering;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use model::{MAX_PERSISTENCE_ID_BYTES, ValidationError};

const PREFIX: &str = "p1.";
const CHANGE_PREFIX: &str = "c1.";
/// Longest resume token accepted in an offset, in hex characters.
const MAX_CHANGE_TOKEN: usize = 1024;

/// A place in read-journal order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub written_at_millis: i64,
    pub persistence_id: String,
    /// Sequence number of an event, or revision of a durable-state change.
    pub sequence_nr: i64,
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        (
            self.written_at_millis,
            &self.persistence_id,
            self.sequence_nr,
        )
            .cmp(&(
                other.written_at_millis,
                &other.persistence_id,
                other.sequence_nr,
            ))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Position {
    fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(16 + self.persistence_id.len());
        bytes.extend_from_slice(&self.written_at_millis.to_be_bytes());
        bytes.extend_from_slice(&self.sequence_nr.to_be_bytes());
        bytes.extend_from_slice(self.persistence_id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn token(&self) -> String {
        format!("{PREFIX}{}", self.encode())
    }

    /// `""` is the start (`None`); anything else must be a token this service issued.
    pub fn parse_offset(field: &str, token: &str) -> Result<Option<Position>, ValidationError> {
        Ok(Offset::parse(field, token)?.map(|offset| offset.position))
    }

    fn decode(
        encoded: &str,
        malformed: &dyn Fn(&str) -> ValidationError,
    ) -> Result<Position, ValidationError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| malformed("not base64"))?;
        if bytes.len() < 17 || bytes.len() > 16 + MAX_PERSISTENCE_ID_BYTES {
            return Err(malformed("wrong length"));
        }
        let (millis, rest) = bytes.split_at(8);
        let (sequence_nr, pid) = rest.split_at(8);
        let written_at_millis =
            i64::from_be_bytes(millis.try_into().map_err(|_| malformed("wrong length"))?);
        let sequence_nr = i64::from_be_bytes(
            sequence_nr
                .try_into()
                .map_err(|_| malformed("wrong length"))?,
        );
        let persistence_id = String::from_utf8(pid.to_vec()).map_err(|_| malformed("not UTF-8"))?;
        if written_at_millis < 0 || sequence_nr < 0 {
            return Err(malformed("negative field"));
        }
        Ok(Position {
            written_at_millis,
            persistence_id,
            sequence_nr,
        })
    }
}

/// What an envelope's offset token says: the position, and for an event delivered from a change
/// stream, the change's resume token (hex `_data`; the oplog orders tokens as strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    pub position: Position,
    pub change: Option<String>,
}

impl From<Position> for Offset {
    fn from(position: Position) -> Self {
        Self {
            position,
            change: None,
        }
    }
}

impl Offset {
    pub fn token(&self) -> String {
        match &self.change {
            None => self.position.token(),
            Some(change) => format!("{CHANGE_PREFIX}{}.{change}", self.position.encode()),
        }
    }

    /// `""` is the start (`None`); anything else must be a token this service issued.
    pub fn parse(field: &str, token: &str) -> Result<Option<Offset>, ValidationError> {
        if token.is_empty() {
            return Ok(None);
        }
        let malformed = |why: &str| {
            ValidationError::new(
                field,
                format!(
                    "is not an offset this service issued ({why}): {:?}",
                    shorten(token)
                ),
            )
        };
        if let Some(encoded) = token.strip_prefix(PREFIX) {
            return Ok(Some(Position::decode(encoded, &malformed)?.into()));
        }
        let rest = token
            .strip_prefix(CHANGE_PREFIX)
            .ok_or_else(|| malformed("unknown format"))?;
        let (encoded, change) = rest
            .split_once('.')
            .ok_or_else(|| malformed("no resume token"))?;
        if change.is_empty()
            || change.len() > MAX_CHANGE_TOKEN
            || !change.bytes().all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(malformed("bad resume token"));
        }
        let position = Position::decode(encoded, &malformed)?;
        Ok(Some(Offset {
            position,
            change: Some(change.to_owned()),
        }))
    }
}

fn shorten(token: &str) -> String {
    token.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_is_the_start_and_garbage_is_rejected() {
        assert_eq!(Offset::parse("offset", "").unwrap(), None);
        for bad in [
            "x",
            "p1.",
            "p1.!!!",
            "p2.AAAA",
            "p1.AAAAAAAAAAAAAAAAAAAAAA",
            "c1.AAAA",
            "c1.x.zz",
        ] {
            let error = Offset::parse("offset", bad).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("offset: is not an offset this service issued"),
                "{error}"
            );
        }
    }

    proptest! {
        #[test]
        fn tokens_round_trip(written_at in 0..i64::MAX, sequence_nr in 0..i64::MAX, pid in "\\PC{1,40}") {
            let position = Position { written_at_millis: written_at, persistence_id: pid, sequence_nr };
            let parsed = Position::parse_offset("offset", &position.token()).unwrap();
            prop_assert_eq!(parsed, Some(position));
        }

        #[test]
        fn change_tokens_round_trip(written_at in 0..i64::MAX, pid in "\\PC{1,40}", change in "[0-9A-F]{2,200}") {
            let position = Position { written_at_millis: written_at, persistence_id: pid, sequence_nr: 7 };
            let offset = Offset { position, change: Some(change) };
            prop_assert_eq!(Offset::parse("offset", &offset.token()).unwrap(), Some(offset));
        }

        #[test]
        fn parsing_never_panics(token in ".{0,200}") {
            let _ = Offset::parse("offset", &token);
            let _ = Offset::parse("offset", &format!("c1.{token}"));
        }

        #[test]
        fn order_is_written_at_then_pid_then_sequence_nr(
            a in (0..5i64, "[ab]", 0..5i64), b in (0..5i64, "[ab]", 0..5i64)
        ) {
            let left = Position { written_at_millis: a.0, persistence_id: a.1.clone(), sequence_nr: a.2 };
            let right = Position { written_at_millis: b.0, persistence_id: b.1.clone(), sequence_nr: b.2 };
            prop_assert_eq!(left.cmp(&right), (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        }
    }
}
