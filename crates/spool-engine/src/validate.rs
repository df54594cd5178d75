//! Checks of the job model's inputs against the limits in [`crate::limits`],
//! shared by every broker (the engine and the PostgreSQL broker) so that the
//! same bad input is refused with the same field and message everywhere.

use std::collections::BTreeMap;

use spool_broker::{Backoff, BrokerError, QueuePolicy};

use crate::limits;

/// Checks a job's headers: how many, their names, their total size.
pub fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), BrokerError> {
    if headers.len() > limits::HEADERS_MAX {
        return Err(BrokerError::invalid(
            "headers",
            format!("at most {} headers", limits::HEADERS_MAX),
        ));
    }
    let mut total = 0;
    for (name, value) in headers {
        if name.is_empty() || name.len() > limits::HEADER_NAME_MAX_BYTES {
            return Err(BrokerError::invalid(
                "headers",
                format!(
                    "header names are 1 to {} bytes",
                    limits::HEADER_NAME_MAX_BYTES
                ),
            ));
        }
        total += name.len() + value.len();
    }
    if total > limits::HEADERS_MAX_BYTES {
        return Err(BrokerError::invalid(
            "headers",
            format!("at most {} bytes of headers", limits::HEADERS_MAX_BYTES),
        ));
    }
    Ok(())
}

/// Checks a backoff's fields, naming the bad one.
pub fn check_backoff(backoff: Option<&Backoff>) -> Result<(), BrokerError> {
    match backoff.map(Backoff::validate) {
        Some(Err((field, message))) => Err(BrokerError::invalid(field, message)),
        _ => Ok(()),
    }
}

/// Checks a queue policy: its backoff, its dispatch limits and its TTR.
pub fn check_policy(policy: &QueuePolicy) -> Result<(), BrokerError> {
    check_backoff(policy.backoff.as_ref())?;
    if policy.concurrency == Some(0) {
        return Err(BrokerError::invalid("concurrency", "at least 1"));
    }
    if let Some(rate) = policy.rate_per_s {
        if !rate.is_finite() || rate <= 0.0 || rate > limits::RATE_PER_S_MAX {
            return Err(BrokerError::invalid(
                "rate_per_s",
                format!("above 0, at most {}", limits::RATE_PER_S_MAX),
            ));
        }
    }
    if policy.ttr_ms.is_some_and(|t| t > limits::TTR_MS_MAX) {
        return Err(BrokerError::invalid("ttr_ms", "too large"));
    }
    Ok(())
}
