//! The beanstalkd text protocol, sans I/O.
//!
//! This crate owns the wire format and nothing else: it turns bytes into
//! [`Request`]s and [`Response`]s into bytes (server side), and the reverse
//! (client side). It never touches a socket, a clock or job state, so the
//! server, the `spool` CLI, the benchmark and fuzzers all share it.
//!
//! Every limit of the project lives in [`limits`], with its reason.

pub mod limits;
mod name;
mod request;
mod response;

pub use name::{is_name_byte, TubeName, TubeNameError};
pub use request::{encode_request, ProtocolError, Put, PutBody, Request, RequestDecoder};
pub use response::{
    encode_response, push_decimal, JobStats, ProcessStats, Response, ResponseDecoder,
    ResponseError, ServerStats, TubeStats,
};
