//! What kind of MongoDB the connection reached, and whether eventjournal can run on it: the
//! server and every operator command refuse a deployment that cannot work with a message that
//! says what to do, instead of the first failing command's error.

use config::{DatabaseMode, MongoSettings, redact_uri};
use mongodb::Database;
use mongodb::bson::{Document, doc};

/// The oldest MongoDB eventjournal runs on: backups read at one point in time with read
/// concern `snapshot` outside transactions, which MongoDB 5.0 introduced (the suite runs 6.0).
pub const MINIMUM_VERSION: (u32, u32) = (5, 0);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// A single `mongod` without `--replSet`.
    Standalone,
    ReplicaSet {
        name: String,
        primary: Option<String>,
        /// Data-bearing members that can become primary (`hello.hosts`).
        hosts: Vec<String>,
        /// Data-bearing members that cannot (priority 0, `hello.passives`).
        passives: Vec<String>,
        arbiters: Vec<String>,
    },
    /// A `mongos` in front of a sharded cluster.
    Sharded,
}

/// Who made the server: CosmosDB and DocumentDB speak MongoDB's protocol but differ in what
/// they support (`mongodb.database-mode = "cosmos"` covers both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MongoDb,
    CosmosDb,
    DocumentDb,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::MongoDb => "MongoDB",
            Flavor::CosmosDb => "Azure CosmosDB",
            Flavor::DocumentDb => "Amazon DocumentDB",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub topology: Topology,
    pub flavor: Flavor,
    /// `buildInfo.version`, e.g. "6.0.5" (CosmosDB: its API version).
    pub version: String,
    /// The `hello` reply, for checks that need more of it (`localTime`).
    pub hello: Document,
}

/// Asks the server what it is (`hello` and `buildInfo`).
pub async fn detect(database: &Database, uri: &str) -> Result<Deployment, mongodb::error::Error> {
    let admin = database.client().database("admin");
    let hello = admin.run_command(doc! { "hello": 1 }).await?;
    let version = admin
        .run_command(doc! { "buildInfo": 1 })
        .await
        .ok()
        .and_then(|info| info.get_str("version").ok().map(str::to_owned))
        .unwrap_or_default();
    let strings = |key: &str| -> Vec<String> {
        hello
            .get_array(key)
            .map(|values| {
                values
                    .iter()
                    .filter_map(|value| value.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let topology = if hello.get_str("msg") == Ok("isdbgrid") {
        Topology::Sharded
    } else if let Ok(name) = hello.get_str("setName") {
        Topology::ReplicaSet {
            name: name.to_owned(),
            primary: hello.get_str("primary").ok().map(str::to_owned),
            hosts: strings("hosts"),
            passives: strings("passives"),
            arbiters: strings("arbiters"),
        }
    } else {
        Topology::Standalone
    };
    let mut names = strings("hosts");
    names.push(uri.to_ascii_lowercase());
    Ok(Deployment {
        topology,
        flavor: flavor_of(&names),
        version,
        hello,
    })
}

/// CosmosDB and DocumentDB are told apart by their host names, as the MongoDB drivers do
/// when they warn about them.
fn flavor_of(names: &[String]) -> Flavor {
    let any = |suffixes: &[&str]| {
        names.iter().any(|name| {
            let name = name.to_ascii_lowercase();
            suffixes.iter().any(|suffix| name.contains(suffix))
        })
    };
    if any(&[".cosmos.azure.com", ".cosmos.azure.cn"]) {
        Flavor::CosmosDb
    } else if any(&[".docdb.amazonaws.com", ".docdb-elastic.amazonaws.com"]) {
        Flavor::DocumentDb
    } else {
        Flavor::MongoDb
    }
}

/// `major.minor` of a version string such as "6.0.5" or "7.0.1-rc0".
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl Deployment {
    /// Data-bearing members: the ones that can acknowledge a write.
    pub fn data_bearing_members(&self) -> usize {
        match &self.topology {
            Topology::ReplicaSet {
                hosts, passives, ..
            } => hosts.len() + passives.len(),
            _ => 1,
        }
    }

    /// Genuine MongoDB older than [`MINIMUM_VERSION`] (CosmosDB's version names its API level).
    pub fn too_old(&self) -> bool {
        self.flavor == Flavor::MongoDb
            && major_minor(&self.version).is_some_and(|version| version < MINIMUM_VERSION)
    }

    /// Why eventjournal cannot run against this deployment with these settings, in words an
    /// operator can act on; `None` when it can. `uri` names the server in the message.
    pub fn unsupported(&self, settings: &MongoSettings) -> Option<String> {
        let uri = redact_uri(&settings.uri);
        if self.flavor != Flavor::MongoDb && settings.database_mode == DatabaseMode::Mongo {
            return Some(format!(
                "{uri} is {}, which does not support everything mongo mode uses (retryable \
                 writes, TTL indexes on any field, change streams as MongoDB has them): set \
                 mongodb.database-mode = \"cosmos\" (see docs/DATA_LIFECYCLE.md)",
                self.flavor.name()
            ));
        }
        if self.topology == Topology::Standalone {
            return Some(standalone_message(&uri));
        }
        if self.too_old() {
            return Some(format!(
                "{uri} runs MongoDB {}, older than {}.{}, the oldest eventjournal supports: \
                 upgrade MongoDB",
                self.version, MINIMUM_VERSION.0, MINIMUM_VERSION.1
            ));
        }
        if let Ok(w) = settings.write_concern.w.parse::<usize>() {
            let members = self.data_bearing_members();
            if w > members {
                return Some(format!(
                    "mongodb.write-concern.w = {w}, but the deployment at {uri} has {members} \
                     data-bearing member(s): every write would wait for mongodb.write-concern.timeout \
                     and fail. Set w = \"majority\" (or at most {members})"
                ));
            }
        }
        None
    }
}

/// The two commands that make a standalone a single-member replica set (start-up error and
/// `check`'s fix).
pub const STANDALONE_FIX: &str = "To turn it into a single-member replica set:\n  \
     1. restart it with a replica-set name: mongod --replSet rs0 --dbpath <its data directory> \
     (in a container: docker run mongo:6 --replSet rs0; in mongod.conf: \
     replication.replSetName: rs0)\n  \
     2. initiate the set once: mongosh \"<the same address>\" --eval 'rs.initiate()'\n\
     then connect with ?replicaSet=rs0 in mongodb.uri.";

/// The standalone case, with [`STANDALONE_FIX`].
fn standalone_message(uri: &str) -> String {
    format!(
        "MongoDB at {uri} is a standalone server, but eventjournal needs a replica set \
         (transactions and change streams exist only there); a single-member replica set is \
         enough for development. {STANDALONE_FIX}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert_eq!(major_minor("6.0.5"), Some((6, 0)));
        assert_eq!(major_minor("7.0.1-rc0"), Some((7, 0)));
        assert_eq!(major_minor(""), None);
        assert!(major_minor("4.4.29").unwrap() < MINIMUM_VERSION);
        assert!(major_minor("5.0.0").unwrap() >= MINIMUM_VERSION);
    }

    #[test]
    fn cosmos_and_documentdb_are_known_by_their_host_names() {
        let flavor = |name: &str| flavor_of(&[name.to_owned()]);
        assert_eq!(
            flavor("mongodb://u:p@acct.mongo.cosmos.azure.com:10255/?ssl=true"),
            Flavor::CosmosDb
        );
        assert_eq!(
            flavor("docdb-1.cluster-abc.eu-west-1.docdb.amazonaws.com:27017"),
            Flavor::DocumentDb
        );
        assert_eq!(flavor("mongodb://127.0.0.1:27017"), Flavor::MongoDb);
    }

    fn replica_set(data_bearing: usize) -> Deployment {
        Deployment {
            topology: Topology::ReplicaSet {
                name: "rs0".to_owned(),
                primary: Some("a:1".to_owned()),
                hosts: (0..data_bearing).map(|n| format!("h{n}:1")).collect(),
                passives: vec![],
                arbiters: vec![],
            },
            flavor: Flavor::MongoDb,
            version: "6.0.5".to_owned(),
            hello: Document::new(),
        }
    }

    #[test]
    fn what_cannot_work_is_refused_with_what_to_do() {
        let mut settings = MongoSettings::default();
        assert_eq!(replica_set(1).unsupported(&settings), None);

        settings.write_concern.w = "3".to_owned();
        let refused = replica_set(1).unsupported(&settings).unwrap();
        assert!(refused.contains("mongodb.write-concern.w = 3"), "{refused}");
        assert_eq!(replica_set(3).unsupported(&settings), None);
        settings.write_concern.w = "majority".to_owned();

        let mut old = replica_set(1);
        old.version = "4.4.29".to_owned();
        let refused = old.unsupported(&settings).unwrap();
        assert!(refused.contains("older than 5.0"), "{refused}");

        let mut cosmos = replica_set(1);
        cosmos.flavor = Flavor::CosmosDb;
        let refused = cosmos.unsupported(&settings).unwrap();
        assert!(refused.contains("database-mode = \"cosmos\""), "{refused}");
        settings.database_mode = DatabaseMode::Cosmos;
        assert_eq!(cosmos.unsupported(&settings), None);

        let mut standalone = replica_set(1);
        standalone.topology = Topology::Standalone;
        let refused = standalone.unsupported(&settings).unwrap();
        assert!(refused.contains("--replSet rs0"), "{refused}");
        assert!(refused.contains("rs.initiate()"), "{refused}");
    }
}
