//! Errors as the one line a person reads (`error:` lines, warnings in the log), with MongoDB
//! driver errors reduced to the server's message and code name ([`mongo::describe_chain`]).
//! The driver's own text (the raw server reply, the topology report) goes to the debug log.

use std::error::Error;

/// `error` and its causes, joined by ": ".
pub fn for_people(error: &(dyn Error + 'static)) -> String {
    mongo::describe_chain(error)
}

/// The causes of `error` (not `error` itself).
pub fn causes_for_people(error: &(dyn Error + 'static)) -> String {
    error.source().map(for_people).unwrap_or_default()
}
