use config::{MongoSettings, redact_uri};
use mongodb::options::{
    Acknowledgment, ClientOptions, CommitQuorum, ReadConcern, Tls, TlsOptions, WriteConcern,
};
use mongodb::{Client, Database, bson::doc};

/// A client for the configured database. Connecting is lazy: the first operation (or [`ping`])
/// finds out whether MongoDB is reachable.
pub async fn connect(settings: &MongoSettings) -> Result<Database, mongodb::error::Error> {
    let mut options = ClientOptions::parse(&settings.uri).await?;
    // An appName in the URI wins: operators tell deployments apart by it in MongoDB's logs.
    options
        .app_name
        .get_or_insert_with(|| "eventjournal".to_owned());
    // Every write of the service is idempotent by content (a journal write or durable-state
    // change retried after it was applied is recognised; snapshot saves replace; deletes and
    // `$max` repeat harmlessly), and `mongodb.retry` retries them. The driver's retryable
    // writes would add a `config.transactions` update to each insert for nothing (and
    // CosmosDB does not support them), so they are off unless the URI asks for them.
    options.retry_writes.get_or_insert(false);
    options.connect_timeout = Some(settings.connect_timeout);
    options.server_selection_timeout = Some(settings.server_selection_timeout);
    options.max_pool_size = Some(settings.max_pool_size);
    options.min_pool_size = Some(settings.min_pool_size);
    options.read_concern = Some(read_concern(&settings.read_concern));
    options.write_concern = Some(
        WriteConcern::builder()
            .w(acknowledgment(&settings.write_concern.w))
            .journal(settings.write_concern.journal)
            .w_timeout(settings.write_concern.timeout)
            .build(),
    );
    if settings.tls.enabled {
        let mut tls = TlsOptions::default();
        tls.ca_file_path = settings.tls.ca_file.clone();
        tls.cert_key_file_path = settings.tls.certificate_key_file.clone();
        options.tls = Some(Tls::Enabled(tls));
    }
    options.sdam_event_handler = Some(crate::metrics::topology_watcher());
    let client = Client::with_options(options)?;
    tracing::debug!(uri = %redact_uri(&settings.uri), database = %settings.database, "mongodb client created");
    Ok(client.database(&settings.database))
}

/// Round trip to the server, to fail fast at start-up when MongoDB is unreachable.
pub async fn ping(database: &Database) -> Result<(), mongodb::error::Error> {
    database.run_command(doc! { "ping": 1 }).await.map(|_| ())
}

pub fn commit_quorum(value: &str) -> CommitQuorum {
    match value {
        "votingMembers" => CommitQuorum::VotingMembers,
        "majority" => CommitQuorum::Majority,
        other => match other.parse::<u32>() {
            Ok(nodes) => CommitQuorum::Nodes(nodes),
            Err(_) => CommitQuorum::Custom(other.to_owned()),
        },
    }
}

fn acknowledgment(w: &str) -> Acknowledgment {
    match w.trim().parse::<u32>() {
        Ok(nodes) => Acknowledgment::Nodes(nodes),
        Err(_) => Acknowledgment::from(w.trim()),
    }
}

fn read_concern(level: &str) -> ReadConcern {
    match level {
        "local" => ReadConcern::local(),
        "linearizable" => ReadConcern::linearizable(),
        "available" => ReadConcern::available(),
        _ => ReadConcern::majority(),
    }
}

/// MongoDB's code for creating a collection that already exists.
const NAMESPACE_EXISTS: i32 = 48;

/// Creates the collections that do not exist yet, with `validationLevel: off`: a validator
/// someone adds later must not reject the service's writes (which also pass
/// `bypassDocumentValidation` when configured). Existing collections are left as they are.
pub async fn create_collections(
    database: &Database,
    names: &[&str],
) -> Result<(), mongodb::error::Error> {
    let existing = database.list_collection_names().await?;
    for name in names {
        if existing.iter().any(|existing| existing == name) {
            continue;
        }
        let created = database
            .create_collection(*name)
            .validation_level(mongodb::options::ValidationLevel::Off)
            .await;
        match created {
            // Another server created it meanwhile.
            Err(error) if crate::error_codes(&error).contains(&NAMESPACE_EXISTS) => {}
            other => other?,
        }
    }
    Ok(())
}
