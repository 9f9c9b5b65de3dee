//! Any S3-compatible object store (AWS S3, MinIO, Ceph, R2, ...), through `object_store`.
//! Each collection of a backup is one object written by a multipart upload, a few parts in
//! flight at once; the manifest is a single PUT, written last.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt as _, PutPayload};
use tokio::task::JoinSet;

use super::{Store, Upload};
use crate::manifest::MANIFEST;

/// S3's most parts in one multipart upload.
const MAX_PARTS: usize = 10_000;

/// Where and how to reach the bucket. Unset credentials and region come from the usual AWS
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`, web identity or instance metadata).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix the backups go under (`<prefix>/<backup id>/...`); empty: the bucket's root.
    pub prefix: String,
    pub region: Option<String>,
    /// A custom endpoint (`http://` allowed) for S3-compatible stores; unset: AWS.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Parts uploaded at once per object.
    pub parallelism: usize,
    /// How long a failing request is retried; unset: object_store's default (3 minutes).
    pub retry_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
pub struct S3 {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    parallelism: usize,
    retry_timeout: std::time::Duration,
}

fn to_io(error: object_store::Error) -> io::Error {
    match error {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, error),
        other => io::Error::other(other),
    }
}

impl S3 {
    pub fn new(options: &S3Options) -> io::Result<Self> {
        if options.bucket.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no S3 bucket configured (backup.s3.bucket)",
            ));
        }
        // reqwest's rustls takes the process-wide crypto provider; ring, as everywhere here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &options.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(key) = &options.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(retry_timeout) = options.retry_timeout {
            builder = builder.with_retry(object_store::RetryConfig {
                retry_timeout,
                ..Default::default()
            });
        }
        let store = builder.build().map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("S3 bucket {}: {error}", options.bucket),
            )
        })?;
        Ok(Self {
            store: Arc::new(store),
            bucket: options.bucket.clone(),
            prefix: options.prefix.trim_matches('/').to_owned(),
            parallelism: options.parallelism.max(1),
            retry_timeout: options
                .retry_timeout
                .unwrap_or(std::time::Duration::from_secs(180)),
        })
    }

    fn path(&self, path: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(path)
        } else {
            Path::from(format!("{}/{path}", self.prefix))
        }
    }

    fn prefix_path(&self) -> Option<Path> {
        (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()))
    }
}

/// An S3 multipart upload with up to `parallelism` parts in flight.
pub struct S3Upload {
    upload: Box<dyn MultipartUpload>,
    parts: usize,
    retry_timeout: std::time::Duration,
    in_flight: JoinSet<object_store::Result<()>>,
    parallelism: usize,
}

impl S3Upload {
    async fn wait_for_one(&mut self) -> io::Result<()> {
        if let Some(done) = self.in_flight.join_next().await {
            done.map_err(io::Error::other)?.map_err(to_io)?;
        }
        Ok(())
    }
}

impl Store for S3 {
    type Upload = S3Upload;

    async fn upload(&self, path: &str) -> io::Result<S3Upload> {
        let upload = self
            .store
            .put_multipart(&self.path(path))
            .await
            .map_err(to_io)?;
        Ok(S3Upload {
            upload,
            parts: 0,
            retry_timeout: self.retry_timeout,
            in_flight: JoinSet::new(),
            parallelism: self.parallelism,
        })
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> io::Result<()> {
        self.store
            .put(&self.path(path), PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(to_io)
    }

    async fn get(&self, path: &str) -> io::Result<Vec<u8>> {
        let got = self.store.get(&self.path(path)).await.map_err(to_io)?;
        Ok(got.bytes().await.map_err(to_io)?.to_vec())
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        let path = self.path(path);
        match self.store.get_range(&path, range.clone()).await {
            Ok(bytes) => Ok(bytes.to_vec()),
            // A range past the end of a truncated object is an error for S3: read what is
            // there (its size asked only then, not for every part).
            Err(error) => {
                let size = self.store.head(&path).await.map_err(to_io)?.size;
                if range.end <= size {
                    return Err(to_io(error));
                }
                let range = range.start.min(size)..size;
                if range.is_empty() {
                    return Ok(Vec::new());
                }
                let bytes = self.store.get_range(&path, range).await.map_err(to_io)?;
                Ok(bytes.to_vec())
            }
        }
    }

    async fn complete_backups(&self) -> io::Result<Vec<String>> {
        let prefix = self.prefix_path();
        let mut ids: Vec<String> = self
            .store
            .list(prefix.as_ref())
            .try_filter_map(|object| {
                let mut parts: Vec<String> = object
                    .location
                    .parts()
                    .map(|part| part.as_ref().to_owned())
                    .collect();
                let id = (parts.len() >= 2 && parts[parts.len() - 1] == MANIFEST).then(|| {
                    parts.pop();
                    parts.pop().unwrap_or_default()
                });
                async move { Ok(id) }
            })
            .try_collect()
            .await
            .map_err(to_io)?;
        ids.sort();
        Ok(ids)
    }

    async fn delete_backup(&self, id: &str) -> io::Result<()> {
        let objects = self
            .store
            .list(Some(&self.path(id)))
            .map_ok(|object| object.location)
            .boxed();
        self.store
            .delete_stream(objects)
            .try_collect::<Vec<_>>()
            .await
            .map_err(to_io)?;
        Ok(())
    }

    fn describe(&self, id: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.path(id))
    }
}

impl Upload for S3Upload {
    async fn part(&mut self, bytes: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        self.parts += 1;
        if self.parts > MAX_PARTS {
            return Err(io::Error::other(format!(
                "more than {MAX_PARTS} parts, S3's limit for one object: raise backup.part-size \
                 (the collection is larger than {MAX_PARTS} times it)"
            )));
        }
        while self.in_flight.len() >= self.parallelism {
            self.wait_for_one().await?;
        }
        // The payload owns the buffer until the part is uploaded: none to give back.
        self.in_flight
            .spawn(self.upload.put_part(PutPayload::from(bytes)));
        Ok(None)
    }

    async fn finish(mut self) -> io::Result<()> {
        let finished = async {
            while !self.in_flight.is_empty() {
                self.wait_for_one().await?;
            }
            self.upload.complete().await.map(drop).map_err(to_io)
        }
        .await;
        if let Err(error) = finished {
            // A part or the completion failed: the upload goes, or its parts stay stored.
            if let Err(abort) = self.abort_upload().await {
                tracing::warn!(error = %abort, "could not abort a failed multipart upload");
            }
            return Err(error);
        }
        Ok(())
    }

    async fn abort(mut self) -> io::Result<()> {
        self.abort_upload().await
    }
}

impl S3Upload {
    async fn abort_upload(&mut self) -> io::Result<()> {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        // The store may be failing right now (that is often why the upload is given up):
        // try again for as long as any request would be, or its parts stay stored, unlisted.
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match self.upload.abort().await {
                Ok(()) => return Ok(()),
                Err(error) if started.elapsed() + pause > self.retry_timeout => {
                    return Err(to_io(error));
                }
                Err(error) => {
                    tracing::debug!(%error, "aborting a multipart upload failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }
}
