//! The baseline: the mongodb driver doing the service's inserts directly, with nothing in
//! between. The client is made by the service's own `mongo::connect` from the service's default
//! settings, so write concern (majority + journal), pool size and timeouts cannot differ; the
//! collection gets exactly the service's journal indexes before anything is measured.

use anyhow::Context;
use config::MongoSettings;
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::{Collection, Database};

/// A reading of mongod's `opLatencies.writes` counters.
#[derive(Debug, Clone, Copy)]
pub struct MongodWrites {
    micros: i64,
    operations: i64,
}

impl MongodWrites {
    /// The mean time mongod spent on each write command between `earlier` and this reading,
    /// µs; `None` when there was none.
    pub fn mean_since(&self, earlier: &MongodWrites) -> Option<f64> {
        let operations = self.operations - earlier.operations;
        (operations > 0).then(|| (self.micros - earlier.micros) as f64 / operations as f64)
    }
}

pub struct RawDriver {
    database: Database,
    events: Collection<RawDocumentBuf>,
    journal: String,
    durable_state: String,
}

impl RawDriver {
    /// Connects to `database` and prepares its journal collection as the service prepares its
    /// own (collection with validation off, `journal::index_models()`).
    pub async fn connect(uri: &str, database: &str) -> anyhow::Result<Self> {
        let settings = Self::settings(uri, database);
        let database = mongo::connect(&settings)
            .await
            .context("raw driver: connecting to MongoDB")?;
        let journal = settings.collections.journal.as_str();
        let durable_state = settings.collections.durable_state.clone();
        mongo::create_collections(&database, &[journal])
            .await
            .context("raw driver: creating the journal collection")?;
        let events = database.collection::<RawDocumentBuf>(journal);
        events
            .create_indexes(journal::index_models())
            .await
            .context("raw driver: creating the journal indexes")?;
        Ok(Self {
            database,
            events,
            journal: journal.to_owned(),
            durable_state,
        })
    }

    /// The service's defaults with the benchmark's URI and database.
    pub fn settings(uri: &str, database: &str) -> MongoSettings {
        MongoSettings {
            uri: uri.to_owned(),
            database: database.to_owned(),
            ..MongoSettings::default()
        }
    }

    pub async fn insert_one(&self, document: &RawDocumentBuf) -> anyhow::Result<()> {
        self.events
            .insert_one(document)
            .await
            .context("raw driver: insert_one")?;
        Ok(())
    }

    /// Ordered, as the service's transaction inserts a multi-event write.
    pub async fn insert_many(&self, documents: &[RawDocumentBuf]) -> anyhow::Result<()> {
        self.events
            .insert_many(documents)
            .await
            .context("raw driver: insert_many")?;
        Ok(())
    }

    /// `database`'s durable-state collection, with the service's default read concern: what
    /// `DurableStateStore/GetObject` reads with one `find_one` by `_id`. Taken once, so a timed
    /// read does not build handles.
    pub fn objects(&self, database: &str) -> Collection<Document> {
        self.database
            .client()
            .database(database)
            .collection(&self.durable_state)
    }

    /// The reply of the admin command `{ name: 1 }`.
    async fn admin_command(&self, name: &str) -> anyhow::Result<Document> {
        self.database
            .client()
            .database("admin")
            .run_command(doc! { name: 1 })
            .await
            .context(name.to_owned())
    }

    /// `buildInfo`'s version of the mongod the benchmark runs against.
    pub async fn mongod_version(&self) -> anyhow::Result<String> {
        let info = self.admin_command("buildInfo").await?;
        Ok(info.get_str("version").unwrap_or("unknown").to_owned())
    }

    /// mongod's own time in write commands so far (`serverStatus` `opLatencies.writes`:
    /// inserts, updates, deletes and findAndModify, from receipt to reply, write concern
    /// included).
    pub async fn mongod_writes(&self) -> anyhow::Result<MongodWrites> {
        let status = self.admin_command("serverStatus").await?;
        let writes = status
            .get_document("opLatencies")
            .and_then(|latencies| latencies.get_document("writes"))
            .context("serverStatus: no opLatencies.writes")?;
        // Both are 64-bit integers (`NumberLong`), like `serverStatus`'s `pid`.
        Ok(MongodWrites {
            micros: writes
                .get_i64("latency")
                .context("serverStatus: opLatencies.writes.latency")?,
            operations: writes
                .get_i64("ops")
                .context("serverStatus: opLatencies.writes.ops")?,
        })
    }

    /// mongod's process id (`serverStatus`), for its CPU time when it runs on this machine.
    pub async fn mongod_pid(&self) -> anyhow::Result<u32> {
        let status = self.admin_command("serverStatus").await?;
        let pid = status.get_i64("pid").context("serverStatus: no pid")?;
        u32::try_from(pid).context("serverStatus: pid out of range")
    }

    /// The shape of the stored event of `pid` in `database`'s journal collection: each field
    /// (nested ones as `payload.data`) with its BSON type, in stored order. Two sides writing
    /// "the same documents" must store the same shape.
    pub async fn stored_shape(&self, database: &str, pid: &str) -> anyhow::Result<Vec<String>> {
        let stored = self
            .database
            .client()
            .database(database)
            .collection::<Document>(&self.journal)
            .find_one(doc! { journal::document::PERSISTENCE_ID: pid })
            .await
            .with_context(|| format!("reading an event of {pid} from {database}"))?
            .with_context(|| format!("no event of {pid} in {database}"))?;
        let mut shape = Vec::new();
        describe_shape(&stored, "", &mut shape);
        Ok(shape)
    }

    /// Drops a database the benchmark created (its own or the service's).
    pub async fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        self.database
            .client()
            .database(name)
            .drop()
            .await
            .with_context(|| format!("dropping database {name}"))
    }
}

fn describe_shape(document: &Document, prefix: &str, shape: &mut Vec<String>) {
    for (key, value) in document {
        shape.push(format!("{prefix}{key}: {:?}", value.element_type()));
        match value {
            Bson::Document(inner) => describe_shape(inner, &format!("{prefix}{key}."), shape),
            Bson::Array(items) => {
                for item in items {
                    shape.push(format!("{prefix}{key}[]: {:?}", item.element_type()));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MongodWrites;

    #[test]
    fn mongod_writes_give_the_mean_time_of_the_writes_between_two_readings() {
        let before = MongodWrites {
            micros: 1_000,
            operations: 10,
        };
        let after = MongodWrites {
            micros: 1_000 + 3 * 850,
            operations: 13,
        };
        assert_eq!(after.mean_since(&before), Some(850.0));
        assert_eq!(before.mean_since(&before), None);
    }
}
