//! A spool for producers: writes go to a bounded on-disk log first and reach the service from
//! there, in order, so a producer keeps accepting data while the service or MongoDB is out of
//! reach, and loses none of it.
//!
//! * [`Spool::send`] appends an atomic write to the log (fsynced) and returns; when the log
//!   holds `max_bytes` not yet acknowledged, it waits for room (the producer is pushed back,
//!   nothing is dropped).
//! * A background task sends what is in the log, in order, in batches of `batch` writes, retrying
//!   for as long as the service is unreachable, and removes what is acknowledged.
//! * After a crash or restart, [`Spool::open`] on the same directory resumes with what is on
//!   disk: records not yet acknowledged are sent again, and because writes are idempotent a write
//!   that had in fact been stored is answered `Written` again, not stored twice. A record torn by
//!   the crash (a partial append) is cut off.
//! * A write the service refuses for good (`Rejected`, or a `Conflict`: another writer has that
//!   sequence number with other content, or a record whose request the service refuses as
//!   invalid, e.g. one larger than its messages) is not retried for ever: it goes to
//!   `rejected.log` in the directory with the reason, and is counted. Batches are capped in
//!   records and in bytes (`SpoolOptions::batch_bytes`).
//!
//! Layout: `NNNNNNNNNNNNNNNNNNNN.seg` segments of records `[length u32 LE][crc32 u32 LE][the
//! write, protobuf-encoded]`, and `ack`: the segment and offset of the first record not yet
//! acknowledged.
//!
//! ```no_run
//! use eventjournal_client::spool::{Spool, SpoolOptions};
//! use eventjournal_client::{Client, Event, Payload};
//!
//! # async fn example(client: Client) -> eventjournal_client::Result<()> {
//! let spool = Spool::open("/var/lib/gateway/spool", client, SpoolOptions::default()).await?;
//! for n in 1..=1_000 {
//!     let reading = Event::new("sensor-7", n, Payload::new(b"21.5".to_vec(), 1, "Celsius"));
//!     spool.send(vec![reading]).await?; // on disk now; at the service soon
//! }
//! spool.drained().await; // everything acknowledged
//! # Ok(())
//! # }
//! ```

use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use proto::v1 as pb;
use tokio::sync::Notify;

use crate::{Client, Error, Event, Result, WriteOutcome};

const HEADER: u64 = 8;

/// How much the spool holds and how it sends.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Bytes of records not yet acknowledged the log may hold; `send` waits beyond.
    pub max_bytes: u64,
    /// A new segment file is started past this size (acknowledged segments are deleted whole).
    pub segment_bytes: u64,
    /// Atomic writes sent per `WriteEvents` call.
    pub batch: usize,
    /// Record bytes sent per `WriteEvents` call at most (a larger record goes alone): keep it
    /// well under the server's `server.max-message-size`.
    pub batch_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            segment_bytes: 16 << 20,
            batch: 100,
            batch_bytes: 8 << 20,
        }
    }
}

/// A position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Position {
    segment: u64,
    offset: u64,
}

struct Log {
    directory: PathBuf,
    /// The segment being appended to, and its size.
    writing: Position,
    file: std::fs::File,
    /// The first record not acknowledged.
    acked: Position,
    /// Bytes of records not yet acknowledged.
    pending: u64,
}

struct Shared {
    log: Mutex<Log>,
    options: SpoolOptions,
    /// Signalled when records are appended.
    appended: Notify,
    /// Signalled when records are acknowledged (room, and maybe drained).
    acknowledged: Notify,
    rejected: AtomicU64,
}

/// A spool on a directory; see the module documentation.
pub struct Spool {
    shared: Arc<Shared>,
    sender: tokio::task::JoinHandle<()>,
}

fn segment_path(directory: &Path, segment: u64) -> PathBuf {
    directory.join(format!("{segment:020}.seg"))
}

fn io_error(what: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |error| Error::Configuration(format!("spool {what}: {error}"))
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Log> {
    shared
        .log
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Spool {
    /// Opens (creating) the spool in `directory` and starts sending what it holds to `client`.
    pub async fn open(
        directory: impl AsRef<Path>,
        client: Client,
        options: SpoolOptions,
    ) -> Result<Self> {
        let directory = directory.as_ref().to_owned();
        let log = tokio::task::spawn_blocking(move || recover(&directory))
            .await
            .map_err(|error| Error::Configuration(format!("spool: {error}")))??;
        let shared = Arc::new(Shared {
            log: Mutex::new(log),
            options,
            appended: Notify::new(),
            acknowledged: Notify::new(),
            rejected: AtomicU64::new(0),
        });
        let sender = tokio::spawn(send_forever(shared.clone(), client));
        Ok(Self { shared, sender })
    }

    /// Appends an atomic write (events of one persistence id, stored all or none) to the log,
    /// waiting while the log is full. Once it returns, the write is on disk.
    pub async fn send(&self, events: Vec<Event>) -> Result<()> {
        let write = pb::AtomicWrite {
            events: events.into_iter().map(Into::into).collect(),
        };
        let body = write.encode_to_vec();
        let length = HEADER + body.len() as u64;
        loop {
            let room = self.shared.acknowledged.notified();
            {
                let mut log = lock(&self.shared);
                if log.pending == 0 || log.pending + length <= self.shared.options.max_bytes {
                    append(&mut log, &body, self.shared.options.segment_bytes)
                        .map_err(io_error("append"))?;
                    log.pending += length;
                    break;
                }
            }
            room.await;
        }
        self.shared.appended.notify_one();
        Ok(())
    }

    /// Bytes on disk not yet acknowledged by the service.
    pub fn pending_bytes(&self) -> u64 {
        lock(&self.shared).pending
    }

    /// Writes the service refused for good, written to `rejected.log`, since the spool opened.
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Waits until everything sent so far is acknowledged.
    pub async fn drained(&self) {
        loop {
            let acknowledged = self.shared.acknowledged.notified();
            if self.pending_bytes() == 0 {
                return;
            }
            acknowledged.await;
        }
    }
}

impl Drop for Spool {
    /// Stops sending; what is not acknowledged stays on disk for the next [`Spool::open`].
    fn drop(&mut self) {
        self.sender.abort();
    }
}

/// Appends a record to the current segment (starting a new one when it is full) and syncs it.
///
/// An append that fails (disk full, an I/O error) may leave part of its record in the file.
/// It is cut off, here or before the next append: a record written after it would start inside
/// a torn one, and be read (and recovered) as the end of the log, lost with everything after
/// it although `send` had said it was on disk.
fn append(log: &mut Log, body: &[u8], segment_bytes: u64) -> io::Result<()> {
    if log.file.metadata()?.len() > log.writing.offset {
        log.file.set_len(log.writing.offset)?;
    }
    if log.writing.offset >= segment_bytes {
        let next = log.writing.segment + 1;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&log.directory, next))?;
        // The new segment's name is on disk before a record in it is said to be.
        std::fs::File::open(&log.directory)?.sync_all()?;
        log.file = file;
        log.writing = Position {
            segment: next,
            offset: 0,
        };
    }
    let mut record = Vec::with_capacity(HEADER as usize + body.len());
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    record.extend_from_slice(body);
    if let Err(error) = log
        .file
        .write_all(&record)
        .and_then(|()| log.file.sync_data())
    {
        // Not on disk as far as the producer knows: cut it off (tried again before the next
        // append if this fails too).
        let _ = log.file.set_len(log.writing.offset);
        return Err(error);
    }
    log.writing.offset += record.len() as u64;
    Ok(())
}

/// Reads one record at `offset` of `file`; `None` at the end or at a torn record.
fn read_record(file: &mut std::fs::File, offset: u64) -> io::Result<Option<Vec<u8>>> {
    file.seek(io::SeekFrom::Start(offset))?;
    let mut header = [0_u8; HEADER as usize];
    if file.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut body = vec![0_u8; length];
    if file.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
        return Ok(None);
    }
    Ok(Some(body))
}

/// The position an `ack` file holds: `<segment> <offset>` and a line end, nothing else.
fn parse_ack(text: &str) -> Option<Position> {
    let (segment, offset) = text.strip_suffix('\n')?.split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// Whether `position` starts a record of the log in `directory` (or is its end): its segment is
/// on disk (or the log has none yet), and the records from the segment's start end exactly there.
fn is_record_start(directory: &Path, segments: &[u64], position: Position) -> bool {
    if segments.is_empty() {
        return position.offset == 0;
    }
    if !segments.contains(&position.segment) {
        return false;
    }
    let Ok(mut file) = std::fs::File::open(segment_path(directory, position.segment)) else {
        return false;
    };
    let mut offset = 0;
    while offset < position.offset {
        match read_record(&mut file, offset) {
            Ok(Some(body)) => offset += HEADER + body.len() as u64,
            _ => return false,
        }
    }
    offset == position.offset
}

/// Opens the log in `directory`: the acknowledged position, the segments after it, the last
/// one cut after its last whole record.
fn recover(directory: &Path) -> Result<Log> {
    std::fs::create_dir_all(directory).map_err(io_error("create the directory"))?;
    let mut segments: Vec<u64> = std::fs::read_dir(directory)
        .map_err(io_error("read the directory"))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    segments.sort_unstable();
    let first = Position {
        segment: segments.first().copied().unwrap_or(1),
        offset: 0,
    };
    let ack = directory.join("ack");
    let recorded = std::fs::read_to_string(&ack)
        .ok()
        .map(|text| parse_ack(&text).filter(|acked| is_record_start(directory, &segments, *acked)));
    let acked = match recorded {
        Some(Some(acked)) => {
            // Segments wholly acknowledged whose deletion a crash cut short go now.
            for segment in segments.iter().filter(|segment| **segment < acked.segment) {
                std::fs::remove_file(segment_path(directory, *segment))
                    .map_err(io_error("delete an acknowledged segment"))?;
            }
            acked
        }
        Some(None) => {
            // Not a position in the log (the file damaged): nothing is deleted, and every
            // record is sent again (the service answers a write it has as written).
            tracing::warn!(
                "spool: {} does not name the start of a record; sending the log from its first \
                 record again",
                ack.display()
            );
            first
        }
        None => first,
    };
    segments.retain(|segment| *segment >= acked.segment);
    let last = segments.last().copied().unwrap_or(acked.segment.max(1));
    // The last segment ends after its last whole record: a torn append is cut off.
    let path = segment_path(directory, last);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(io_error("open a segment"))?;
    let mut end = 0;
    while let Some(body) = read_record(&mut file, end).map_err(io_error("read a segment"))? {
        end += HEADER + body.len() as u64;
    }
    file.set_len(end).map_err(io_error("cut a torn record"))?;
    let mut pending = 0;
    for segment in segments.iter().filter(|segment| **segment >= acked.segment) {
        let size = if *segment == last {
            end
        } else {
            std::fs::metadata(segment_path(directory, *segment))
                .map_err(io_error("read a segment"))?
                .len()
        };
        let start = if *segment == acked.segment {
            acked.offset
        } else {
            0
        };
        pending += size.saturating_sub(start);
    }
    Ok(Log {
        directory: directory.to_owned(),
        writing: Position {
            segment: last,
            offset: end,
        },
        file,
        acked,
        pending,
    })
}

/// Up to `batch` records from `from`, of `max_bytes` at most (the first in any case): the
/// writes, and the position after the last.
fn read_batch(
    directory: &Path,
    mut from: Position,
    writing: Position,
    batch: usize,
    max_bytes: u64,
) -> io::Result<(Vec<pb::AtomicWrite>, Position, u64)> {
    let mut writes = Vec::new();
    let mut bytes = 0;
    while writes.len() < batch && from < writing {
        let mut file = match std::fs::File::open(segment_path(directory, from.segment)) {
            Ok(file) => file,
            Err(error)
                if error.kind() == io::ErrorKind::NotFound && from.segment < writing.segment =>
            {
                from = Position {
                    segment: from.segment + 1,
                    offset: 0,
                };
                continue;
            }
            Err(error) => return Err(error),
        };
        let limit = if from.segment == writing.segment {
            writing.offset
        } else {
            u64::MAX
        };
        while writes.len() < batch && from.offset < limit {
            match read_record(&mut file, from.offset)? {
                Some(body)
                    if !writes.is_empty() && bytes + HEADER + body.len() as u64 > max_bytes =>
                {
                    return Ok((writes, from, bytes));
                }
                Some(body) => {
                    from.offset += HEADER + body.len() as u64;
                    bytes += HEADER + body.len() as u64;
                    writes
                        .push(pb::AtomicWrite::decode(body.as_slice()).map_err(io::Error::other)?);
                }
                None => break,
            }
        }
        if writes.len() < batch && from.segment < writing.segment {
            from = Position {
                segment: from.segment + 1,
                offset: 0,
            };
        } else {
            break;
        }
    }
    Ok((writes, from, bytes))
}

/// Sends what the log holds, in order, for as long as the spool is open.
async fn send_forever(shared: Arc<Shared>, client: Client) {
    let mut backoff = Duration::from_millis(100);
    // Records still to send one at a time (see below).
    let mut alone: usize = 0;
    loop {
        let appended = shared.appended.notified();
        let (directory, acked, writing) = {
            let log = lock(&shared);
            (log.directory.clone(), log.acked, log.writing)
        };
        if acked >= writing {
            // Nothing to send; a timeout too, in case a notification was missed.
            let _ = tokio::time::timeout(Duration::from_secs(1), appended).await;
            continue;
        }
        // After a batch the service refused as a whole as invalid, one record at a time, to
        // find the one it cannot take.
        let batch = if alone > 0 { 1 } else { shared.options.batch };
        let batch_bytes = shared.options.batch_bytes;
        let read = tokio::task::spawn_blocking({
            let directory = directory.clone();
            move || read_batch(&directory, acked, writing, batch, batch_bytes)
        })
        .await;
        let Ok(Ok((writes, next, sent))) = read else {
            tracing::error!("spool: cannot read its log; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let events: Vec<Vec<Event>> = writes
            .iter()
            .map(|write| write.events.iter().cloned().map(Into::into).collect())
            .collect();
        let outcomes = match client.write_events(events).await {
            Ok(outcomes) => outcomes,
            // The request itself is refused (a record too large for the server's messages):
            // sent again one record at a time, and a record refused alone is refused for good,
            // as a `Rejected` write is (else nothing after it would ever be sent).
            Err(Error::InvalidArgument(reason)) if writes.len() > 1 => {
                tracing::warn!(%reason, "spool: the service refused a batch; sending it a record at a time");
                alone = writes.len();
                continue;
            }
            Err(Error::InvalidArgument(reason)) => vec![WriteOutcome::Rejected(reason)],
            Err(error) => {
                // Unreachable, or anything else: the records stay, and are sent again.
                tracing::warn!(%error, "spool: sending failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        alone = alone.saturating_sub(1);
        for (outcome, write) in outcomes
            .iter()
            .zip(writes.iter().map(|write| &write.events))
        {
            if let WriteOutcome::Rejected(reason) | WriteOutcome::Conflict(reason) = outcome {
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                let line = format!(
                    "{} {}..={}: {reason}\n",
                    write
                        .first()
                        .map(|e| e.persistence_id.as_str())
                        .unwrap_or(""),
                    write.first().map(|e| e.sequence_nr).unwrap_or(0),
                    write.last().map(|e| e.sequence_nr).unwrap_or(0),
                );
                tracing::error!("spool: a write was refused for good: {line}");
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(directory.join("rejected.log"))
                    .and_then(|mut file| file.write_all(line.as_bytes()));
            }
        }
        // Acknowledged: the position moves on, on disk first, then fully sent segments go.
        let saved = tokio::task::spawn_blocking({
            let directory = directory.clone();
            move || -> io::Result<()> {
                let temporary = directory.join("ack.tmp");
                let mut file = std::fs::File::create(&temporary)?;
                file.write_all(format!("{} {}\n", next.segment, next.offset).as_bytes())?;
                file.sync_data()?;
                std::fs::rename(&temporary, directory.join("ack"))?;
                // The new position is durable before the segments it passed are deleted.
                std::fs::File::open(&directory)?.sync_all()?;
                for segment in acked.segment..next.segment {
                    let _ = std::fs::remove_file(segment_path(&directory, segment));
                }
                Ok(())
            }
        })
        .await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::error!("spool: cannot record what was acknowledged; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        {
            let mut log = lock(&shared);
            log.pending = log.pending.saturating_sub(sent);
            log.acked = next;
        }
        shared.acknowledged.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence_nr: i64) -> Vec<u8> {
        pb::AtomicWrite {
            events: vec![pb::PersistentEvent {
                persistence_id: "p".into(),
                sequence_nr,
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    fn sequence_nrs(writes: &[pb::AtomicWrite]) -> Vec<i64> {
        writes
            .iter()
            .map(|write| write.events[0].sequence_nr)
            .collect()
    }

    /// A directory of its own for one test's log.
    fn test_directory() -> PathBuf {
        std::env::temp_dir().join(format!(
            "eventjournal-spool-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ))
    }

    /// An append that failed part-way left the start of its record in the segment (as
    /// `write_all` does when the disk fills): the next append still starts a whole record,
    /// and it is read, and recovered after a restart, with the records before it.
    #[test]
    fn a_record_after_a_failed_append_is_not_lost() {
        let directory = test_directory();
        let mut log = recover(&directory).unwrap();
        append(&mut log, &record(1), u64::MAX).unwrap();
        // What a failed append leaves: part of a record, the offset not moved past it.
        log.file.write_all(&[42_u8; 12]).unwrap();
        append(&mut log, &record(2), u64::MAX).unwrap();

        let (writes, _, _) = read_batch(&directory, log.acked, log.writing, 10, u64::MAX).unwrap();
        assert_eq!(sequence_nrs(&writes), [1, 2]);
        drop(log);
        let log = recover(&directory).unwrap();
        let (writes, _, _) = read_batch(&directory, log.acked, log.writing, 10, u64::MAX).unwrap();
        assert_eq!(sequence_nrs(&writes), [1, 2], "after a restart");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// A log of three segments holding one record each (sequence numbers 1, 2, 3).
    fn three_segments() -> PathBuf {
        let directory = test_directory();
        std::fs::create_dir_all(&directory).unwrap();
        for (segment, sequence_nr) in [(1, 1), (2, 2), (3, 3)] {
            let mut log = Log {
                directory: directory.clone(),
                writing: Position { segment, offset: 0 },
                file: std::fs::File::create(segment_path(&directory, segment)).unwrap(),
                acked: Position { segment, offset: 0 },
                pending: 0,
            };
            append(&mut log, &record(sequence_nr), u64::MAX).unwrap();
        }
        directory
    }

    /// A crash between recording the acknowledged position and deleting the segments it
    /// passed leaves them behind: they go when the spool opens, and the records after the
    /// position are still the ones sent next.
    #[test]
    fn segments_left_behind_by_a_crash_after_an_acknowledgement_are_deleted() {
        let directory = three_segments();
        std::fs::write(directory.join("ack"), "3 0\n").unwrap();

        let log = recover(&directory).unwrap();
        assert!(!segment_path(&directory, 1).exists());
        assert!(!segment_path(&directory, 2).exists());
        let (writes, _, _) = read_batch(&directory, log.acked, log.writing, 10, u64::MAX).unwrap();
        assert_eq!(sequence_nrs(&writes), [3]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// An `ack` that names no record's start (damaged: a segment not on disk, an offset inside
    /// a record, a cut line) deletes nothing: the whole log is sent again.
    #[test]
    fn a_damaged_acknowledgement_deletes_nothing_and_sends_everything_again() {
        for damaged in ["9 0\n", "3 5\n", "3 ", "2 0 junk\n"] {
            let directory = three_segments();
            std::fs::write(directory.join("ack"), damaged).unwrap();

            let log = recover(&directory).unwrap();
            let (writes, _, _) =
                read_batch(&directory, log.acked, log.writing, 10, u64::MAX).unwrap();
            assert_eq!(sequence_nrs(&writes), [1, 2, 3], "ack {damaged:?}");
            std::fs::remove_dir_all(&directory).unwrap();
        }
    }
}
