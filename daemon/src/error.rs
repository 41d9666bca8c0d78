//! The daemon's domain errors. Each front end maps them to its protocol in one place
//! (`frontend::grpc::status`, `frontend::http::error`); nothing below the front ends knows
//! those protocols.

use std::path::PathBuf;

/// Everything a request can fail with. Each variant's message is what the client reads.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DaemonError {
    #[error("no resident model named {name:?} (resident: {resident}); load it first")]
    UnknownModel { name: String, resident: String },
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    #[error("no model named {name:?} in the models folder {dir}{hint}")]
    UnknownSource {
        name: String,
        dir: PathBuf,
        hint: String,
    },
    #[error("cannot load {path}: {reason}")]
    BadModelFile { path: PathBuf, reason: String },
    #[error("{0}")]
    NotInHfCache(String),
    #[error("the name {name:?} is already used by {source_path}; unload it first or choose another name")]
    NameTaken { name: String, source_path: PathBuf },
    #[error(
        "{name} needs {needed} bytes but only {available} of the {budget}-byte budget can be \
         freed; held by: {holders}"
    )]
    OverBudget {
        name: String,
        needed: u64,
        available: u64,
        budget: u64,
        holders: String,
    },
    #[error(
        "{model}: one sentence at {beams} beams and {length} tokens needs {needed} bytes of \
         working memory; the model reserved {reserved} at load and the budget has {spare} more \
         free; lower num_beams or max_tokens, or load {model} with more slots"
    )]
    TranslationTooLarge {
        model: String,
        beams: usize,
        length: usize,
        needed: u64,
        reserved: u64,
        spare: u64,
    },
    #[error("{name} is pinned but not loaded yet ({reason}); egpud keeps retrying, or unload it to give it up")]
    PinWaiting { name: String, reason: String },
    /// A model still loading, asked for where waiting for it is not possible (keep-alive);
    /// requests wait for the load instead.
    #[error("{0} is still loading; retry when its load has finished")]
    StillLoading(String),
    #[error("{model}: queue full ({limit} requests waiting); retry later")]
    QueueFull { model: String, limit: usize },
    #[error("{model} is busy ({active} active, {queued} queued); use force to unload anyway")]
    Busy {
        model: String,
        active: usize,
        queued: usize,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the model {0} was unloaded while this request was running")]
    Unloaded(String),
    #[error(
        "the file of {0} was written in place while it was loaded, so egpud unloaded it; \
         replace model files by renaming a new file over the old one"
    )]
    ModelFileChanged(String),
    #[error("egpud is shutting down")]
    ShuttingDown,
    #[error("deadline exceeded after {generated} generated tokens")]
    DeadlineExceeded { generated: usize },
    #[error("unsupported backend {name:?}; available: {available}")]
    UnsupportedBackend { name: String, available: String },
    /// The device went away under running requests (the worker died, was killed for not
    /// answering, or the eGPU was unplugged).
    #[error("device lost: {0}")]
    DeviceLost(String),
    #[error("out of device memory: {0}")]
    DeviceOutOfMemory(String),
    /// The tinygrad worker is not running now (starting, or restarting after a loss).
    #[error("the tinygrad device is not available: {0}")]
    DeviceUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
