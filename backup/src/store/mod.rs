//! The store stage: where a backup's objects go. Each output is one file here: a local
//! directory ([`LocalDirectory`], the default) and any S3-compatible object store ([`S3`]).
//!
//! A backup is a folder of objects, `<backup id>/<name>`: one object per collection, written as
//! an [`Upload`] of parts (an S3 multipart upload; a file written part after part), and the
//! manifest, written last with [`Store::put`].

mod local;
mod s3;

use std::future::Future;
use std::io;
use std::ops::Range;

pub use local::LocalDirectory;
pub use s3::{S3, S3Options};

/// Objects by path (`<backup id>/<name>`).
pub trait Store: Clone + Send + Sync + 'static {
    type Upload: Upload;

    /// Starts writing the object at `path`: nothing is readable there until
    /// [`Upload::finish`].
    fn upload(&self, path: &str) -> impl Future<Output = io::Result<Self::Upload>> + Send;
    /// Stores a small object at once, replacing what was there; readers see all or nothing.
    fn put(&self, path: &str, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
    /// A whole object; `NotFound` when there is none.
    fn get(&self, path: &str) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// Bytes `range` of an object (fewer when the object is shorter).
    fn get_range(
        &self,
        path: &str,
        range: Range<u64>,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// The backups that have a manifest, i.e. are complete, in name (= time) order.
    fn complete_backups(&self) -> impl Future<Output = io::Result<Vec<String>>> + Send;
    /// Removes a backup, complete or not.
    fn delete_backup(&self, id: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Where a backup is, for people.
    fn describe(&self, id: &str) -> String;
}

/// One object being written, part after part.
pub trait Upload: Send + 'static {
    /// Adds the next part; returns once the store accepted it for writing (an S3 upload writes
    /// a few parts at once, and waits here while that many are in flight), with the buffer when
    /// the store is done with it, for reuse.
    fn part(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<Option<Vec<u8>>>> + Send;
    /// Waits for every part and makes the object readable.
    fn finish(self) -> impl Future<Output = io::Result<()>> + Send;
    /// Gives up: nothing of the object stays (an S3 multipart upload is aborted, its parts
    /// deleted).
    fn abort(self) -> impl Future<Output = io::Result<()>> + Send;
}

/// The store the configuration names, either kind behind one type.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Local(LocalDirectory),
    S3(S3),
}

pub enum AnyUpload {
    Local(<LocalDirectory as Store>::Upload),
    S3(<S3 as Store>::Upload),
}

impl Store for AnyStore {
    type Upload = AnyUpload;

    async fn upload(&self, path: &str) -> io::Result<AnyUpload> {
        Ok(match self {
            Self::Local(store) => AnyUpload::Local(store.upload(path).await?),
            Self::S3(store) => AnyUpload::S3(store.upload(path).await?),
        })
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Self::Local(store) => store.put(path, bytes).await,
            Self::S3(store) => store.put(path, bytes).await,
        }
    }

    async fn get(&self, path: &str) -> io::Result<Vec<u8>> {
        match self {
            Self::Local(store) => store.get(path).await,
            Self::S3(store) => store.get(path).await,
        }
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        match self {
            Self::Local(store) => store.get_range(path, range).await,
            Self::S3(store) => store.get_range(path, range).await,
        }
    }

    async fn complete_backups(&self) -> io::Result<Vec<String>> {
        match self {
            Self::Local(store) => store.complete_backups().await,
            Self::S3(store) => store.complete_backups().await,
        }
    }

    async fn delete_backup(&self, id: &str) -> io::Result<()> {
        match self {
            Self::Local(store) => store.delete_backup(id).await,
            Self::S3(store) => store.delete_backup(id).await,
        }
    }

    fn describe(&self, id: &str) -> String {
        match self {
            Self::Local(store) => store.describe(id),
            Self::S3(store) => store.describe(id),
        }
    }
}

impl Upload for AnyUpload {
    async fn part(&mut self, bytes: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        match self {
            Self::Local(upload) => upload.part(bytes).await,
            Self::S3(upload) => upload.part(bytes).await,
        }
    }

    async fn finish(self) -> io::Result<()> {
        match self {
            Self::Local(upload) => upload.finish().await,
            Self::S3(upload) => upload.finish().await,
        }
    }

    async fn abort(self) -> io::Result<()> {
        match self {
            Self::Local(upload) => upload.abort().await,
            Self::S3(upload) => upload.abort().await,
        }
    }
}
