//! The wire to the tinygrad worker: `proto/worker.proto` over tonic, on the worker's private
//! Unix socket.
//!
//! The worker process is egpud's other edge (the clients are the first), so like the front
//! ends this is the one place that names the protocol crates: each call's messages become the
//! backend's own types here, and a failed call becomes an [`RpcError`] saying whether the
//! worker refused the request or can no longer be trusted.

use std::path::Path;

use egpu_engine::models::decoder::LogitsWanted;
use egpu_proto::worker as wp;
use egpu_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::Code;

/// Messages carry full logits rows; a Score over a long text returns one per position.
const MAX_MESSAGE: usize = 1 << 30;

/// A client of one worker process. Cheap to clone: clones share the connection.
#[derive(Debug, Clone)]
pub struct WorkerRpc {
    client: WorkerClient<Channel>,
}

/// The device the worker holds, as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerDevice {
    /// tinygrad's device string (`CUDA`, `AMD`, `CPU`, ...).
    pub device: String,
    /// Marketing name, when the runtime says.
    pub name: String,
    pub arch: String,
    pub interface: String,
    /// The `DEV` value the worker was started with.
    pub dev: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Hello {
    pub protocol_version: u32,
    pub pid: u32,
    pub device: WorkerDevice,
}

/// The worker's memory figures (heartbeats carry them).
#[derive(Debug, Clone, Copy)]
pub struct MemoryReport {
    pub allocated_bytes: u64,
    pub memory_free_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadedOnWorker {
    pub model_id: u64,
    /// Device bytes the model holds.
    pub bytes: u64,
    pub n_vocab: usize,
}

/// One slot's part of a step.
#[derive(Debug, Clone)]
pub struct StepItem {
    pub slot: usize,
    /// Position of `tokens[0]`: the slot's length before this step.
    pub start: usize,
    pub tokens: Vec<u32>,
    pub logits: LogitsWanted,
}

/// The logits of one item: `rows` rows of `n_vocab` values.
#[derive(Debug, Clone)]
pub struct StepRows {
    pub rows: usize,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct StepReply {
    pub n_vocab: usize,
    pub items: Vec<StepRows>,
    /// Device bytes the model holds after the step, its captured graphs included (0: not
    /// reported).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Unloaded {
    pub bytes_freed: u64,
    pub allocated_bytes: u64,
}

/// How a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFailure {
    /// The worker refused the request (bad arguments, an unsupported model); the device is
    /// as it was.
    Rejected,
    /// The device is out of memory.
    OutOfMemory,
    /// The worker failed inside the call.
    Internal,
    /// The call did not complete (the transport broke, the worker vanished, ...).
    Broken,
}

#[derive(Debug, Clone)]
pub struct RpcError {
    pub failure: RpcFailure,
    pub message: String,
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> RpcError {
        let failure = match status.code() {
            Code::InvalidArgument | Code::Unimplemented | Code::NotFound => RpcFailure::Rejected,
            Code::ResourceExhausted => RpcFailure::OutOfMemory,
            Code::Internal => RpcFailure::Internal,
            _ => RpcFailure::Broken,
        };
        RpcError {
            failure,
            message: status.message().to_owned(),
        }
    }
}

impl WorkerRpc {
    /// Connects to a worker serving on `socket`.
    pub async fn connect(socket: &Path) -> Result<WorkerRpc, String> {
        let channel = egpu_proto::connect_channel(socket)
            .await
            .map_err(|e| e.to_string())?;
        Ok(WorkerRpc {
            client: WorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }

    pub async fn hello(&self) -> Result<Hello, RpcError> {
        let reply = self
            .client
            .clone()
            .hello(wp::HelloRequest {})
            .await?
            .into_inner();
        let d = reply.device.unwrap_or_default();
        Ok(Hello {
            protocol_version: reply.protocol_version,
            pid: reply.pid,
            device: WorkerDevice {
                device: d.device,
                name: d.name,
                arch: d.arch,
                interface: d.interface,
                dev: d.dev,
                memory_total_bytes: d.memory_total_bytes,
                memory_free_bytes: d.memory_free_bytes,
            },
        })
    }

    pub async fn ping(&self) -> Result<MemoryReport, RpcError> {
        let reply = self
            .client
            .clone()
            .ping(wp::PingRequest {})
            .await?
            .into_inner();
        Ok(MemoryReport {
            allocated_bytes: reply.allocated_bytes,
            memory_free_bytes: reply.memory_free_bytes,
        })
    }

    pub async fn load(
        &self,
        path: &Path,
        context: usize,
        slots: usize,
        config_json: String,
    ) -> Result<LoadedOnWorker, RpcError> {
        let request = wp::LoadRequest {
            path: path.display().to_string(),
            context: context as u32,
            slots: slots as u32,
            config_json,
        };
        let reply = self.client.clone().load(request).await?.into_inner();
        Ok(LoadedOnWorker {
            model_id: reply.model_id,
            bytes: reply.bytes,
            n_vocab: reply.n_vocab as usize,
        })
    }

    /// Makes slot `to` hold the first `positions` of slot `from`; the model's device bytes
    /// after it.
    pub async fn copy_prefix(
        &self,
        model_id: u64,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<u64, RpcError> {
        let request = wp::CopyPrefixRequest {
            model_id,
            from_slot: from as u32,
            to_slot: to as u32,
            positions: positions as u32,
        };
        let reply = self.client.clone().copy_prefix(request).await?.into_inner();
        Ok(reply.bytes)
    }

    /// One forward pass; `hidden` asks for final hidden states instead of logits.
    pub async fn step(
        &self,
        model_id: u64,
        items: Vec<StepItem>,
        hidden: bool,
    ) -> Result<StepReply, RpcError> {
        let request = wp::StepRequest {
            model_id,
            hidden,
            items: items
                .into_iter()
                .map(|item| wp::StepItem {
                    slot: item.slot as u32,
                    start_pos: item.start as u32,
                    tokens: item.tokens,
                    logits: match item.logits {
                        LogitsWanted::None => wp::LogitsWanted::None,
                        LogitsWanted::Last => wp::LogitsWanted::Last,
                        LogitsWanted::All => wp::LogitsWanted::All,
                    } as i32,
                })
                .collect(),
        };
        let reply = self.client.clone().step(request).await?.into_inner();
        Ok(StepReply {
            n_vocab: reply.n_vocab as usize,
            bytes: reply.bytes,
            items: reply
                .items
                .into_iter()
                .map(|item| StepRows {
                    rows: item.rows as usize,
                    // Little-endian f32s; a trailing partial value (a broken reply) is
                    // dropped, and the length check of the caller catches it.
                    values: item
                        .values
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                })
                .collect(),
        })
    }

    pub async fn unload(&self, model_id: u64) -> Result<Unloaded, RpcError> {
        let reply = self
            .client
            .clone()
            .unload(wp::UnloadRequest { model_id })
            .await?
            .into_inner();
        Ok(Unloaded {
            bytes_freed: reply.bytes_freed,
            allocated_bytes: reply.allocated_bytes,
        })
    }
}
