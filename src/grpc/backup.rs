//! `eventjournal.v1.BackupService`: backups and restores as jobs on this server, for a platform
//! to drive (admin role, see `auth.rs`). The work is the `backup` crate's, as for the CLI; a job
//! runs in a task of its own and its state lives in this server's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use backup::store::{AnyStore, Store as _};
use proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::ops::backup as ops;

/// Finished jobs kept for `GetJob`; the oldest go first.
const FINISHED_JOBS_KEPT: usize = 1_000;
/// Jobs running at once on one server: each holds a pipeline's buffers and blocking threads.
const RUNNING_JOBS: usize = 2;

pub(crate) struct BackupService {
    settings: Arc<config::Settings>,
    database: mongodb::Database,
    store: Result<AnyStore, String>,
    jobs: Arc<Mutex<HashMap<String, pb::BackupJob>>>,
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BackupService {
    pub(crate) fn new(settings: &config::Settings, database: &mongodb::Database) -> Self {
        Self {
            settings: Arc::new(settings.clone()),
            database: database.clone(),
            store: ops::configured_store(settings)
                .map_err(|error| mongo::describe_chain(error.as_ref())),
            jobs: Arc::default(),
        }
    }

    fn store(&self) -> Result<AnyStore, Status> {
        self.store.clone().map_err(|error| {
            Status::failed_precondition(format!("the backup store is not usable: {error}"))
        })
    }

    /// Registers a running job and runs `work` for it; its outcome (the backup's id) ends it.
    /// `RESOURCE_EXHAUSTED` when this server already runs its share of jobs.
    fn spawn(
        &self,
        mut job: pb::BackupJob,
        work: impl Future<Output = anyhow::Result<String>> + Send + 'static,
    ) -> Result<pb::BackupJob, Status> {
        job.job_id = uuid::Uuid::new_v4().simple().to_string();
        job.state = "running".to_owned();
        job.started_at_millis = now_millis();
        let jobs = self.jobs.clone();
        {
            let mut jobs = lock(&jobs);
            let running = jobs.values().filter(|job| job.state == "running").count();
            if running >= RUNNING_JOBS {
                return Err(Status::resource_exhausted(format!(
                    "{running} backup or restore jobs are running on this server (at most \
                     {RUNNING_JOBS}); start this one when one of them has finished"
                )));
            }
            if jobs.len() >= FINISHED_JOBS_KEPT
                && let Some(oldest) = jobs
                    .values()
                    .filter(|job| job.state != "running")
                    .min_by_key(|job| job.finished_at_millis)
                    .map(|job| job.job_id.clone())
            {
                jobs.remove(&oldest);
            }
            jobs.insert(job.job_id.clone(), job.clone());
        }
        let id = job.job_id.clone();
        tokio::spawn(async move {
            // A panic in the work fails the job rather than leaving it running for ever.
            let outcome = match tokio::spawn(work).await {
                Ok(outcome) => outcome,
                Err(error) => Err(anyhow::anyhow!("the job stopped: {error}")),
            };
            let mut jobs = lock(&jobs);
            if let Some(job) = jobs.get_mut(&id) {
                job.finished_at_millis = now_millis();
                match outcome {
                    Ok(backup_id) => {
                        job.state = "succeeded".to_owned();
                        job.backup_id = backup_id;
                    }
                    Err(error) => {
                        tracing::warn!(job = %id, error = mongo::describe_chain(error.as_ref()), "backup job failed");
                        job.state = "failed".to_owned();
                        job.error = mongo::describe_chain(error.as_ref());
                    }
                }
            }
        });
        Ok(job)
    }
}

#[tonic::async_trait]
impl pb::backup_service_server::BackupService for BackupService {
    async fn start_backup(
        &self,
        request: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::BackupJob>, Status> {
        let request = request.into_inner();
        let store = self.store()?;
        let mut options = ops::configured_options(&self.settings, request.incremental)
            .map_err(|error| Status::failed_precondition(mongo::describe_chain(error.as_ref())))?;
        const ROLES: [&str; 4] = ["journal", "journal_metadata", "snapshots", "durable_state"];
        if let Some(unknown) = request
            .collections
            .iter()
            .find(|collection| !ROLES.contains(&collection.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "collections: unknown collection {unknown:?}; one of {}",
                ROLES.join(", ")
            )));
        }
        options.selection = backup::Selection {
            collections: request.collections,
            pid_prefix: (!request.pid_prefix.is_empty()).then_some(request.pid_prefix),
            tag: (!request.tag.is_empty()).then_some(request.tag),
        };
        let jobs = self.jobs.clone();
        let job_id = Arc::new(Mutex::new(String::new()));
        let progress_of = job_id.clone();
        options.progress = Some(Arc::new(move |role: &str, documents, bytes| {
            let id = lock(&progress_of).clone();
            if let Some(job) = lock(&jobs).get_mut(&id) {
                let entry = match job
                    .progress
                    .iter()
                    .position(|entry| entry.collection == role)
                {
                    Some(index) => &mut job.progress[index],
                    None => {
                        job.progress.push(pb::CollectionProgress {
                            collection: role.to_owned(),
                            ..Default::default()
                        });
                        job.progress.last_mut().expect("just pushed")
                    }
                };
                entry.documents = documents;
                entry.bytes = bytes;
            }
        }));
        let database = self.database.clone();
        let job = self.spawn(
            pb::BackupJob {
                kind: "backup".to_owned(),
                ..Default::default()
            },
            async move {
                let manifest = backup::backup(&database, &store, &options).await?;
                Ok(manifest.id)
            },
        );
        let job = job?;
        *lock(&job_id) = job.job_id.clone();
        Ok(Response::new(job))
    }

    async fn list_backups(
        &self,
        _request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let store = self.store()?;
        let unavailable = |error: &dyn std::fmt::Display| {
            Status::unavailable(format!("listing the backups: {error}"))
        };
        let mut backups = Vec::new();
        for id in store
            .complete_backups()
            .await
            .map_err(|error| unavailable(&error))?
        {
            let manifest = backup::read_manifest(&store, &id)
                .await
                .map_err(|error| unavailable(&error))?;
            backups.push(pb::BackupInfo {
                documents: manifest.collections.iter().map(|c| c.documents).sum(),
                stored_bytes: manifest
                    .collections
                    .iter()
                    .flat_map(|c| &c.parts)
                    .map(|part| part.bytes)
                    .sum(),
                compression: manifest.compression.to_string(),
                encrypted: !manifest.recipients.is_empty(),
                base: manifest.base.unwrap_or_default(),
                id: manifest.id,
                created_at: manifest.created_at,
                source_database: manifest.source_database,
            });
        }
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::BackupJob>, Status> {
        let id = request.into_inner().job_id;
        lock(&self.jobs)
            .get(&id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no job {id:?} on this server (jobs live on the server that started them)"
                ))
            })
    }

    async fn start_restore(
        &self,
        request: Request<pb::StartRestoreRequest>,
    ) -> Result<Response<pb::BackupJob>, Status> {
        let request = request.into_inner();
        let store = self.store()?;
        let target = request.target_database.trim().to_owned();
        if target.is_empty() {
            return Err(Status::invalid_argument("target_database: empty"));
        }
        if ["admin", "local", "config"].contains(&target.as_str()) {
            return Err(Status::invalid_argument(format!(
                "target_database: {target} is one of MongoDB's own databases"
            )));
        }
        if target == self.database.name() {
            return Err(Status::invalid_argument(format!(
                "target_database: {target} is the database this server serves; restore into \
                 another one (and point a server at it once checked)"
            )));
        }
        let identities = backup::encrypt::identities(&request.identities)
            .map_err(|error| Status::invalid_argument(format!("identities: {error}")))?;
        let id = &request.backup_id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Status::invalid_argument(format!(
                "backup_id {id:?}: not a backup id (letters, digits, '-' and '_', as \
                 ListBackups gives them)"
            )));
        }
        // An unknown backup is an error of the call, not of a job.
        match backup::read_manifest(&store, &request.backup_id).await {
            Ok(_) => {}
            Err(backup::BackupError::NotFound(id)) => {
                return Err(Status::not_found(format!("no complete backup {id:?}")));
            }
            Err(error) => return Err(Status::unavailable(format!("{error}"))),
        }
        let database = self.database.client().database(&target);
        let settings = self.settings.clone();
        let options = backup::RestoreOptions {
            collections: ops::collections(&settings),
            drop: request.drop,
        };
        let id = request.backup_id.clone();
        let job = self.spawn(
            pb::BackupJob {
                kind: "restore".to_owned(),
                backup_id: id.clone(),
                target_database: target,
                ..Default::default()
            },
            async move {
                backup::restore(&store, &id, &identities, &database, &options).await?;
                crate::ops::indexes::create_missing(&database, &settings).await?;
                Ok(id)
            },
        )?;
        Ok(Response::new(job))
    }
}
