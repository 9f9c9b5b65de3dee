//! Bearer-token authentication and role checks, as a tower layer in front of every gRPC
//! service: `UNAUTHENTICATED` without a valid token, `PERMISSION_DENIED` without the role the
//! method needs. Health stays open; reflection needs a valid token of any role.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every configured token,
//! so neither a token's length nor how much of it matched shows in the response time.

use std::sync::Arc;
use std::task::{Context, Poll};

use config::auth::{Role, Token};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    /// Any valid token.
    Authenticated,
    Needs(Role),
}

/// The access each gRPC path needs: `/package.Service/Method`.
fn required(path: &str) -> Access {
    match crate::grpc::service_and_method(path) {
        ("grpc.health.v1.Health", _) => Access::Open,
        ("eventjournal.v1.Journal", "WriteEvents" | "WriteEventsStream" | "DeleteEventsTo")
        | (
            "eventjournal.v1.SnapshotStore",
            "SaveSnapshot" | "DeleteSnapshot" | "DeleteSnapshots",
        )
        | ("eventjournal.v1.DurableStateStore", "UpsertObject" | "DeleteObject") => {
            Access::Needs(Role::Write)
        }
        ("eventjournal.v1.BackupService", _) => Access::Needs(Role::Admin),
        (
            "eventjournal.v1.Journal"
            | "eventjournal.v1.SnapshotStore"
            | "eventjournal.v1.DurableStateStore"
            | "eventjournal.v1.ReadJournal",
            _,
        ) => Access::Needs(Role::Read),
        // Reflection, and anything else (answered UNIMPLEMENTED once authenticated).
        _ => Access::Authenticated,
    }
}

struct Known {
    digest: [u8; 32],
    token: Token,
}

/// The configured tokens, ready for checking.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Known>>);

impl Tokens {
    pub fn new(tokens: &[Token]) -> Self {
        Self(Arc::new(
            tokens
                .iter()
                .map(|token| Known {
                    digest: Sha256::digest(token.secret().as_bytes()).into(),
                    token: token.clone(),
                })
                .collect(),
        ))
    }

    /// The token presented as `authorization: Bearer <token>`, if it is one of ours.
    fn identify(&self, headers: &http::HeaderMap) -> Option<&Token> {
        let presented = headers
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare with every token, without stopping at a match.
        let mut found = None;
        for known in self.0.iter() {
            if bool::from(known.digest.ct_eq(&digest)) {
                found = Some(&known.token);
            }
        }
        found
    }

    fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let access = required(path);
        if access == Access::Open {
            return Ok(());
        }
        let Some(token) = self.identify(headers) else {
            return Err(Status::unauthenticated(
                "missing or unknown bearer token: send the header `authorization: Bearer <token>`",
            ));
        };
        match access {
            Access::Needs(role) if !token.allows(role) => {
                tracing::warn!(token = %token.name, %role, path, "permission denied");
                Err(Status::permission_denied(format!(
                    "token {:?} lacks the {role} role that {path} needs",
                    token.name
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The tower layer; `None` tokens (auth off) lets every call through.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Tokens>,
}

impl AuthLayer {
    pub fn new(settings: &config::AuthSettings) -> Self {
        Self {
            tokens: settings.enabled.then(|| Tokens::new(&settings.tokens)),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && let Err(status) = tokens.authorize(request.uri().path(), request.headers())
        {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_needs_the_role_its_kind_of_work_needs() {
        use Access::*;
        for (path, access) in [
            ("/grpc.health.v1.Health/Check", Open),
            ("/grpc.health.v1.Health/Watch", Open),
            ("/eventjournal.v1.Journal/WriteEvents", Needs(Role::Write)),
            (
                "/eventjournal.v1.Journal/DeleteEventsTo",
                Needs(Role::Write),
            ),
            ("/eventjournal.v1.Journal/ReplayEvents", Needs(Role::Read)),
            (
                "/eventjournal.v1.Journal/ReadHighestSequenceNr",
                Needs(Role::Read),
            ),
            (
                "/eventjournal.v1.SnapshotStore/SaveSnapshot",
                Needs(Role::Write),
            ),
            (
                "/eventjournal.v1.SnapshotStore/DeleteSnapshots",
                Needs(Role::Write),
            ),
            (
                "/eventjournal.v1.SnapshotStore/LoadSnapshot",
                Needs(Role::Read),
            ),
            (
                "/eventjournal.v1.DurableStateStore/UpsertObject",
                Needs(Role::Write),
            ),
            (
                "/eventjournal.v1.DurableStateStore/GetObject",
                Needs(Role::Read),
            ),
            (
                "/eventjournal.v1.ReadJournal/EventsByTag",
                Needs(Role::Read),
            ),
            (
                "/eventjournal.v1.BackupService/StartBackup",
                Needs(Role::Admin),
            ),
            (
                "/eventjournal.v1.BackupService/ListBackups",
                Needs(Role::Admin),
            ),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Authenticated,
            ),
            ("/unknown.Service/Method", Authenticated),
        ] {
            assert_eq!(required(path), access, "{path}");
        }
    }
}
