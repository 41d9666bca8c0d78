//! The connection to egpud, the metadata every request carries, and how failures are told.

use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::egpu_client::EgpuClient;
use egpu_proto::{ConnectError, CLIENT_NAME_HEADER};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// What egpuctl calls itself in the `x-egpu-client` header, so that egpud's fair
/// scheduling sees every egpuctl process under one name.
pub const CLIENT_NAME: &str = "egpuctl";

/// Exit status for any failure other than an unreachable daemon: bad arguments, an error
/// egpud answered with, a file that cannot be read.
pub const EXIT_ERROR: u8 = 1;
/// Exit status when egpud is not running or not answering on the socket, so scripts can
/// tell "start the daemon" apart from every other failure.
pub const EXIT_UNREACHABLE: u8 = 2;

pub type Client = EgpuClient<Channel>;

/// Connects to egpud. The error stays a [`ConnectError`] inside the `anyhow::Error` so that
/// [`report`] can give it its own exit status.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(egpu_proto::connect(socket).await?)
}

/// Wraps a message into a request that names egpuctl to the scheduler.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(CLIENT_NAME_HEADER, MetadataValue::from_static(CLIENT_NAME));
    request
}

/// Prints `error` as one line on stderr and returns the exit status for it.
pub fn report(error: &anyhow::Error) -> ExitCode {
    let (line, code) = describe(error);
    eprintln!("{line}");
    ExitCode::from(code)
}

/// The line and exit status for a failure; separate from [`report`] for tests.
pub fn describe(error: &anyhow::Error) -> (String, u8) {
    if let Some(unreachable) = error.downcast_ref::<ConnectError>() {
        return (format!("egpuctl: {unreachable}"), EXIT_UNREACHABLE);
    }
    if let Some(status) = error.downcast_ref::<tonic::Status>() {
        return (
            format!(
                "egpuctl: {}: {}",
                code_name(status.code()),
                one_line(status.message())
            ),
            EXIT_ERROR,
        );
    }
    // The chain of causes joined by ": ", without a backtrace.
    (
        format!("egpuctl: error: {}", one_line(&format!("{error:#}"))),
        EXIT_ERROR,
    )
}

/// The canonical gRPC name of a status code, as egpu.proto lists them (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Error messages are promised to fit one line; a multi-line message from egpud or a
/// nested cause is folded rather than trusted.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_client() {
        let request = request(());
        assert_eq!(
            request.metadata().get(CLIENT_NAME_HEADER).unwrap(),
            "egpuctl"
        );
    }

    #[test]
    fn rpc_errors_are_one_line_with_the_code() {
        let error = anyhow::Error::from(tonic::Status::not_found("no model named x\nsee list"));
        assert_eq!(
            describe(&error),
            (
                "egpuctl: NOT_FOUND: no model named x see list".to_owned(),
                1
            )
        );
    }

    #[test]
    fn unreachable_daemon_has_its_own_status() {
        let error = anyhow::Error::from(ConnectError::NoSocket {
            path: "/nowhere/egpu.sock".into(),
        });
        let (line, code) = describe(&error);
        assert_eq!(code, EXIT_UNREACHABLE);
        assert!(line.starts_with("egpuctl: egpud is not running"), "{line}");
        assert!(line.contains("/nowhere/egpu.sock"), "{line}");
    }

    #[test]
    fn other_errors_keep_their_causes() {
        let error = anyhow::anyhow!("inner").context("outer");
        assert_eq!(
            describe(&error),
            ("egpuctl: error: outer: inner".to_owned(), 1)
        );
    }
}
