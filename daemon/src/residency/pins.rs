//! Pinned models across restarts: what the state file records of a resident model, and
//! bringing the records back as loads when egpud (or the tinygrad worker) starts.

use std::sync::Arc;

use super::{KeepAlive, LoadOptions, LoadTicket, Residency, Resident};
use crate::backend::BackendKind;
use crate::error::DaemonError;
use crate::state::{PinnedModel, StateStore};

/// The record of a pinned resident model.
pub fn record(r: &Resident) -> PinnedModel {
    PinnedModel {
        name: r.name.clone(),
        source: r.source.display().to_string(),
        context_length: r.context as u32,
        slots: r.slots as u32,
        keep_alive_ms: Some(match r.keep_alive() {
            KeepAlive::Forever => -1,
            KeepAlive::For(d) => d.as_millis().min(i64::MAX as u128) as i64,
        }),
        backend: r.backend.as_str().into(),
    }
}

/// The load that brings a record back.
fn load_options(model: &PinnedModel) -> LoadOptions {
    LoadOptions {
        source: model.source.clone(),
        name: Some(model.name.clone()),
        context: Some(model.context_length as usize).filter(|&c| c > 0),
        slots: Some(model.slots as usize).filter(|&s| s > 0),
        pin: true,
        keep_alive: model.keep_alive_ms.map(KeepAlive::from_millis),
        backend: Some(model.backend.clone()).filter(|b| !b.is_empty()),
        // The source is the converted GGUF itself, whatever its weights' format.
        quantize: None,
    }
}

/// The backend a record names; records from before backends existed are cpu.
fn backend_of(model: &PinnedModel) -> Option<BackendKind> {
    if model.backend.is_empty() {
        Some(BackendKind::Cpu)
    } else {
        BackendKind::parse(&model.backend)
    }
}

/// Starts loading every persisted pinned model of `backend`, then watches the loads: the
/// models show as "loading" in Status at once, and a model that cannot be loaded again (its
/// file is gone, it no longer fits) is logged and dropped from the state. Run it in the
/// background. Tinygrad models are loaded when the worker is ready; records naming an
/// unknown backend are loaded as they are, and their load reports why it cannot be.
pub async fn reload_pinned(
    residency: Arc<Residency>,
    store: Arc<StateStore>,
    backend: BackendKind,
) {
    let models: Vec<PinnedModel> = store
        .pinned()
        .into_iter()
        .filter(|m| match backend_of(m) {
            Some(b) => b == backend,
            None => backend == BackendKind::Cpu,
        })
        .collect();
    if models.is_empty() {
        return;
    }
    tracing::info!(
        count = models.len(),
        state_file = %store.path().display(),
        "reloading pinned models"
    );
    let mut pending = Vec::new();
    for model in models {
        match residency.start_load(load_options(&model)).await {
            Ok(LoadTicket::Resident(_)) => {}
            Ok(ticket @ LoadTicket::Pending { .. }) => pending.push((model, ticket)),
            Err(err) => dropped(&store, &model, &err),
        }
    }
    for (model, ticket) in pending {
        match ticket.wait().await {
            Ok(_) => tracing::info!(model = %model.name, "pinned model resident again"),
            Err(err) => dropped(&store, &model, &err),
        }
    }
}

fn dropped(store: &StateStore, model: &PinnedModel, err: &DaemonError) {
    if matches!(
        err,
        DaemonError::ShuttingDown | DaemonError::DeviceLost(_) | DaemonError::DeviceUnavailable(_)
    ) {
        return; // still pinned: the next start (of egpud, or of the worker) tries again
    }
    tracing::warn!(
        model = %model.name,
        source = %model.source,
        cause = %err,
        "cannot reload a pinned model; dropping it from the state file"
    );
    store.forget_exactly(model);
}
