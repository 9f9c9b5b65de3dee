//! A directory of backups, one subdirectory each.

use std::io::{self, Read, Seek, Write};
use std::ops::Range;
use std::path::PathBuf;

use super::{Store, Upload};
use crate::manifest::MANIFEST;

#[derive(Debug, Clone)]
pub struct LocalDirectory {
    root: PathBuf,
}

impl LocalDirectory {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

/// A file written part after part as `<name>.partial`, renamed into place when finished.
pub struct LocalUpload {
    file: Option<std::fs::File>,
    partial: PathBuf,
    target: PathBuf,
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

impl Store for LocalDirectory {
    type Upload = LocalUpload;

    async fn upload(&self, path: &str) -> io::Result<LocalUpload> {
        let target = self.root.join(path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut partial = target.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = tokio::fs::File::create(&partial).await?.into_std().await;
        Ok(LocalUpload {
            file: Some(file),
            partial,
            target,
        })
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> io::Result<()> {
        let mut upload = self.upload(path).await?;
        upload.part(bytes).await?;
        upload.finish().await
    }

    async fn get(&self, path: &str) -> io::Result<Vec<u8>> {
        tokio::fs::read(self.root.join(path)).await
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        let path = self.root.join(path);
        blocking(move || {
            let mut file = std::fs::File::open(path)?;
            file.seek(io::SeekFrom::Start(range.start))?;
            let mut bytes = Vec::with_capacity((range.end - range.start) as usize);
            file.take(range.end - range.start).read_to_end(&mut bytes)?;
            Ok(bytes)
        })
        .await
    }

    async fn complete_backups(&self) -> io::Result<Vec<String>> {
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut ids = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            // Other files may live beside the backups.
            if !entry.file_type().await?.is_dir() {
                continue;
            }
            if tokio::fs::try_exists(entry.path().join(MANIFEST)).await? {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    async fn delete_backup(&self, id: &str) -> io::Result<()> {
        match tokio::fs::remove_dir_all(self.root.join(id)).await {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn describe(&self, id: &str) -> String {
        self.root.join(id).display().to_string()
    }
}

impl Upload for LocalUpload {
    async fn part(&mut self, bytes: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("an earlier part failed"))?;
        // The part is moved to the blocking thread and back, not copied.
        let (file, bytes) = blocking(move || {
            file.write_all(&bytes)?;
            Ok((file, bytes))
        })
        .await?;
        self.file = Some(file);
        Ok(Some(bytes))
    }

    async fn finish(mut self) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("an earlier part failed"))?;
        blocking(move || file.sync_all()).await?;
        tokio::fs::rename(&self.partial, &self.target).await
    }

    async fn abort(self) -> io::Result<()> {
        drop(self.file);
        match tokio::fs::remove_file(&self.partial).await {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
