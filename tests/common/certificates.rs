//! Test certificates, generated per test with rcgen: a CA, a server certificate for
//! localhost / 127.0.0.1, and a client certificate, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

pub struct Pki {
    pub ca: PathBuf,
    pub server_certificate: PathBuf,
    pub server_key: PathBuf,
    /// Certificate followed by key, as mongod and the MongoDB driver take them.
    pub server_combined: PathBuf,
    pub client_certificate: PathBuf,
    pub client_key: PathBuf,
    pub client_combined: PathBuf,
}

impl Pki {
    /// Writes a fresh PKI into a new directory under the target directory.
    pub fn generate(name: &str) -> Pki {
        let directory = std::env::temp_dir().join(format!(
            "eventjournal-pki-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&directory).unwrap();

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, common_name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![purpose];
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let certificate = params.signed_by(&key, &ca).unwrap();
            (certificate.pem(), key.serialize_pem())
        };
        let (server_certificate, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "localhost",
        );
        let (client_certificate, client_key) = leaf(
            vec!["client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        let write = |file: &str, contents: &str| -> PathBuf {
            let path = directory.join(file);
            std::fs::write(&path, contents).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_combined: write(
                "server-combined.pem",
                &format!("{server_certificate}{server_key}"),
            ),
            server_certificate: write("server.pem", &server_certificate),
            server_key: write("server.key", &server_key),
            client_combined: write(
                "client-combined.pem",
                &format!("{client_certificate}{client_key}"),
            ),
            client_certificate: write("client.pem", &client_certificate),
            client_key: write("client.key", &client_key),
        }
    }

    pub fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }
}
