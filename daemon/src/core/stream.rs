//! A generation as a front end reads it: the runner's events, ending with exactly one `Done`
//! or `Failed`.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::tools::ToolReader;
use crate::error::DaemonError;
use crate::scheduler::events::GenerationEvent;

/// The events of one generation. If the runner's side closes without a final event (its
/// thread died), the stream ends with an INTERNAL failure, so that a truncated generation
/// never looks like a successful one. Dropping the stream cancels the generation at the
/// runner's next step.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<GenerationEvent>,
    ended: bool,
    /// Set when the model was shown tools: how to read calls out of its text.
    pub tools: Option<ToolReader>,
}

impl GenerationStream {
    pub(super) fn new(
        events: mpsc::UnboundedReceiver<GenerationEvent>,
        tools: Option<ToolReader>,
    ) -> GenerationStream {
        GenerationStream {
            events,
            ended: false,
            tools,
        }
    }
}

impl Stream for GenerationStream {
    type Item = GenerationEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                self.ended = !matches!(event, GenerationEvent::Chunk(_));
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(GenerationEvent::Failed(DaemonError::Internal(
                    "the generation stopped without finishing (egpud's batching thread failed)"
                        .into(),
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
