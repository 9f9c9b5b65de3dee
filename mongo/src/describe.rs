//! Driver errors as a person reads them: MongoDB's own message and code name, never the
//! driver's `Display` (which appends the raw server reply as a hex dump) or its topology
//! `Debug` report. The full error stays available for the debug log.

use mongodb::error::{Error, ErrorKind, WriteFailure};

/// One line for people: what MongoDB said (`errmsg`, code name and code) or what went wrong
/// on the way to it.
pub fn describe(error: &Error) -> String {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => {
            server_message(&command.message, &command.code_name, command.code)
        }
        ErrorKind::Write(WriteFailure::WriteError(write)) => server_message(
            &write.message,
            write.code_name.as_deref().unwrap_or(""),
            write.code,
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => format!(
            "write concern not satisfied: {}",
            server_message(&concern.message, &concern.code_name, concern.code)
        ),
        ErrorKind::InsertMany(insert) => {
            if let Some(write) = insert.write_errors.iter().flatten().next() {
                server_message(
                    &write.message,
                    write.code_name.as_deref().unwrap_or(""),
                    write.code,
                )
            } else if let Some(concern) = &insert.write_concern_error {
                format!(
                    "write concern not satisfied: {}",
                    server_message(&concern.message, &concern.code_name, concern.code)
                )
            } else {
                "insert failed".to_owned()
            }
        }
        ErrorKind::ServerSelection { message, .. } => server_selection(message),
        ErrorKind::Authentication { message, .. } => format!("authentication failed: {message}"),
        ErrorKind::Io(io) => format!("network error: {io}"),
        ErrorKind::DnsResolve { message, .. } => format!("cannot resolve the host name: {message}"),
        ErrorKind::InvalidArgument { message, .. } => message.clone(),
        ErrorKind::InvalidTlsConfig { message, .. } => format!("invalid TLS settings: {message}"),
        ErrorKind::ConnectionPoolCleared { message, .. } => message.clone(),
        // The remaining kinds' own texts carry no server reply; the error's Display would.
        other => other.to_string(),
    }
}

/// `error` and its causes joined by ": ", each cause's own text except that a driver error is
/// [`describe`]d (and ends the chain: its sources repeat its report). For `error:` lines and
/// warnings in the log; the full chain belongs in the debug log.
pub fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(driver) = cause.downcast_ref::<Error>() {
            parts.push(describe(driver));
            break;
        }
        let text = cause.to_string();
        // Context layers often repeat the next cause's text.
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

fn server_message(message: &str, code_name: &str, code: i32) -> String {
    if code_name.is_empty() {
        format!("{message} (code {code})")
    } else {
        format!("{message} ({code_name}, code {code})")
    }
}

/// The driver's server-selection message is one line holding the whole topology `Debug`
/// output; what a person needs from it is which server was tried and what it answered.
fn server_selection(message: &str) -> String {
    let mut servers = Vec::new();
    for part in message.split("Address: ").skip(1) {
        let address = part.split([',', ' ']).next().unwrap_or_default();
        let why = part
            .split_once("Error: ")
            .map(|(_, rest)| {
                let rest = rest.strip_prefix("Kind: ").unwrap_or(rest);
                let end = rest.find(", labels:").unwrap_or(rest.len());
                rest[..end].trim_end_matches([' ', '}', ']', ','])
            })
            .filter(|why| !why.is_empty());
        servers.push(match why {
            Some(why) => format!("{address}: {why}"),
            None => format!("{address}: no usable answer"),
        });
    }
    let what = message
        .split(['.', ':'])
        .next()
        .unwrap_or("Server selection timeout");
    if servers.is_empty() {
        what.to_owned()
    } else {
        format!("{what} ({})", servers.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_selection_report_becomes_the_servers_and_their_errors() {
        let message = "Server selection timeout: No available servers. Topology: { Type: \
                       Unknown, Set Name: rs0, Servers: [ { Address: 127.0.0.1:1, Type: \
                       Unknown, Error: Kind: I/O error: Connection refused (os error 111), \
                       labels: {} } ] }";
        assert_eq!(
            server_selection(message),
            "Server selection timeout (127.0.0.1:1: I/O error: Connection refused (os error 111))"
        );
    }

    #[test]
    fn a_server_selection_report_without_servers_keeps_its_first_sentence() {
        assert_eq!(
            server_selection("Server selection timeout: No available servers. Topology: {}"),
            "Server selection timeout"
        );
    }
}
