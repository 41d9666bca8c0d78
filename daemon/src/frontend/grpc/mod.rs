//! The gRPC front end (`egpu.v1` over the Unix socket): each call parses its message, calls
//! one method of the core API, and maps the result ([`convert`]). Health checking and server
//! reflection ride along, so `grpcurl` works without the .proto file.

pub mod convert;
pub mod incoming;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use egpu_proto::v1::egpu_server::{Egpu, EgpuServer};
use egpu_proto::v1::{self as pb, FILE_DESCRIPTOR_SET};
use egpu_proto::CLIENT_NAME_HEADER;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::service::InterceptorLayer;
use tonic::transport::server::UdsConnectInfo;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::core::requests::{Caller, EmbedRequest};
use crate::core::stream::GenerationStream;
use crate::core::tools::ToolStream;
use crate::core::Core;
use crate::error::DaemonError;
use crate::residency::{LoadPhase, LoadTicket};
use crate::scheduler::events::GenerationEvent;
use crate::scheduler::ClientKey;

/// Largest message either way: Translate and Score carry many texts or positions.
const MAX_MESSAGE: usize = 64 << 20;
/// Most gRPC connections served at once (each client usually holds one); more wait.
const MAX_CONNECTIONS: usize = 512;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Serves gRPC on `listener` until `shutdown` completes (after which open streams have been
/// ended by the caller; see `server::run`).
pub async fn serve(
    listener: UnixListener,
    core: Core,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<EgpuServer<GrpcApi>>().await;
    // Reflection in both versions: grpcurl asks for v1, older clients (and grpcio's
    // reflection database) for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?;
    let shutdown = async move {
        shutdown.await;
        health_reporter
            .set_not_serving::<EgpuServer<GrpcApi>>()
            .await;
    };
    Server::builder()
        .layer(InterceptorLayer::new(check_peer))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EgpuServer::new(GrpcApi { core })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming::Incoming::new(listener, MAX_CONNECTIONS), shutdown)
        .await
        .context("serving gRPC")
}

#[derive(Debug)]
pub struct GrpcApi {
    core: Core,
}

fn status(err: DaemonError) -> Status {
    convert::status(err)
}

#[tonic::async_trait]
impl Egpu for GrpcApi {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let report = self.core.status().await;
        Ok(Response::new(convert::status_response(report)))
    }

    type LoadStream = EventStream<pb::LoadEvent>;

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let opts = convert::load_options(request.into_inner());
        let ticket = self.core.load(opts).await.map_err(status)?;
        let stream: Self::LoadStream = match ticket {
            LoadTicket::Resident(r) => {
                Box::pin(tokio_stream::once(Ok(convert::model_event(r.info(), true))))
            }
            LoadTicket::Pending { mut phase, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        let current = phase.borrow_and_update().clone();
                        match current {
                            LoadPhase::Progress(p) => {
                                if tx.send(Ok(convert::load_progress(p))).is_err() {
                                    return; // the client left; the load goes on without it
                                }
                            }
                            LoadPhase::Done(Ok(resident)) => {
                                let _ = tx.send(Ok(convert::model_event(resident.info(), false)));
                                return;
                            }
                            LoadPhase::Done(Err(err)) => {
                                let _ = tx.send(Err(status(err)));
                                return;
                            }
                        }
                        if phase.changed().await.is_err() {
                            // The sender is dropped only after Done was sent; read it.
                            if matches!(*phase.borrow(), LoadPhase::Done(_)) {
                                continue;
                            }
                            let _ = tx.send(Err(Status::internal("the load ended unexpectedly")));
                            return;
                        }
                    }
                });
                Box::pin(UnboundedReceiverStream::new(rx))
            }
        };
        Ok(Response::new(stream))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let req = request.into_inner();
        let unloaded = self
            .core
            .unload(&req.name, req.force)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UnloadResponse {
            freed_bytes: unloaded.freed_bytes,
            aborted_requests: unloaded.aborted_requests as u32,
        }))
    }

    type GenerateStream = EventStream<pb::GenerateEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let caller = caller(&request);
        let req = convert::generate_request(request.into_inner()).map_err(status)?;
        let events = self.core.generate(req, caller).await.map_err(status)?;
        Ok(Response::new(Box::pin(GenerateEvents::new(events))))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let caller = caller(&request);
        let req = convert::score_request(request.into_inner());
        let result = self.core.score(req, caller).await.map_err(status)?;
        Ok(Response::new(convert::score_response(result)))
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let req = EmbedRequest {
            model: req.model,
            inputs: req.inputs,
            dimensions: req.dimensions,
            normalize: req.normalize,
            truncate: false,
        };
        let result = self.core.embed(req, caller).await.map_err(status)?;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: result
                .embeddings
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
            prompt_tokens: result.prompt_tokens as u32,
        }))
    }

    async fn translate(
        &self,
        request: Request<pb::TranslateRequest>,
    ) -> Result<Response<pb::TranslateResponse>, Status> {
        let caller = caller(&request);
        let req = convert::translate_request(request.into_inner());
        let result = self.core.translate(req, caller).await.map_err(status)?;
        Ok(Response::new(convert::translate_response(result)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let tokens = self
            .core
            .tokenize(&req.model, req.text, req.add_special, req.parse_special)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: tokens.token_ids,
            pieces: tokens.pieces,
        }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let text = self
            .core
            .detokenize(&req.model, &req.token_ids)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn list_model_files(
        &self,
        _request: Request<pb::ListModelFilesRequest>,
    ) -> Result<Response<pb::ListModelFilesResponse>, Status> {
        let files = self.core.list_model_files().await.map_err(status)?;
        Ok(Response::new(pb::ListModelFilesResponse {
            models_dir: self.core.residency().models_dir().display().to_string(),
            files: files.into_iter().map(convert::model_file).collect(),
        }))
    }

    async fn prune_conversions(
        &self,
        _request: Request<pb::PruneConversionsRequest>,
    ) -> Result<Response<pb::PruneConversionsResponse>, Status> {
        let (removed, freed) = self.core.prune_conversions().await.map_err(status)?;
        Ok(Response::new(pb::PruneConversionsResponse {
            removed: removed.iter().map(|p| p.display().to_string()).collect(),
            freed_bytes: freed,
        }))
    }
}

/// Who calls and until when: the peer's uid and pid from the socket, the name it gives
/// itself, and the gRPC deadline.
fn caller<T>(request: &Request<T>) -> Caller {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    let name = request
        .metadata()
        .get(CLIENT_NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let deadline = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|d| Instant::now() + d);
    Caller {
        client: ClientKey {
            uid: cred.map_or(u32::MAX, |c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
            name,
        },
        deadline,
    }
}

/// The `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n), as the gRPC
/// protocol sends it.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Rejects peers running as another user. The socket's mode already keeps them out; this
/// also covers a socket whose mode was changed, or root-owned sockets shared by mistake.
pub fn check_peer(request: Request<()>) -> Result<Request<()>, Status> {
    let own = rustix::process::getuid().as_raw();
    let peer = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|c| c.uid());
    match peer {
        Some(uid) if uid == own => Ok(request),
        Some(uid) => Err(Status::permission_denied(format!(
            "egpud serves uid {own} only; this client runs as uid {uid}"
        ))),
        None => Err(Status::permission_denied(
            "egpud could not read the peer's credentials",
        )),
    }
}

/// A generation's events as `GenerateEvent`s. Given tools, each chunk carries only the text that
/// cannot be part of a call (`ToolStream`), and at the end the rest of the text comes as one
/// more chunk and the calls in `GenerateDone`. Dropping it drops the generation's stream, which
/// cancels the generation.
struct GenerateEvents {
    events: GenerationStream,
    tools: Option<ToolStream>,
    /// The done event, after the last chunk it had to wait for.
    done: Option<pb::GenerateEvent>,
}

impl GenerateEvents {
    fn new(events: GenerationStream) -> GenerateEvents {
        GenerateEvents {
            tools: events.tools.clone().map(ToolStream::new),
            events,
            done: None,
        }
    }
}

impl Stream for GenerateEvents {
    type Item = Result<pb::GenerateEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some(done) = self.done.take() {
            return Poll::Ready(Some(Ok(done)));
        }
        let event = match Pin::new(&mut self.events).poll_next(cx) {
            Poll::Ready(Some(event)) => event,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(Some(match event {
            GenerationEvent::Chunk(mut chunk) => {
                if let Some(tools) = self.tools.as_mut() {
                    chunk.text = tools.push(&chunk.text);
                }
                Ok(convert::chunk_event(chunk))
            }
            GenerationEvent::Done(done) => match self.tools.take() {
                Some(tools) => {
                    let (rest, calls) = tools.finish();
                    let done = convert::done_event(done, convert::tool_calls(calls));
                    if rest.is_empty() {
                        Ok(done)
                    } else {
                        self.done = Some(done);
                        Ok(convert::text_event(rest))
                    }
                }
                None => Ok(convert::done_event(done, Vec::new())),
            },
            GenerationEvent::Failed(err) => Err(status(err)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("1x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
