//! The pipelines' buffers as the controller holds them: the embedded backend in its
//! data directory, always there, and a NATS server when the controller was given one
//! (`--nats URL`). A pipeline names its backend in `buffer.backend`; the controller
//! serves embedded buffers to agents over their connection, while agents reach NATS
//! themselves at the URL the task's assignment carries.

use drover_buffer::embedded::EmbeddedBackend;
use drover_buffer::nats::{NatsBackend, NatsOptions};
use drover_buffer::{BufferBackend, BufferError};
use drover_core::pipeline::spec::BufferBackend as BackendKind;
use std::path::Path;
use std::sync::Arc;

/// Where the controller finds a NATS server for `buffer.backend: nats` pipelines.
#[derive(Clone, Debug, Default)]
pub struct BufferSettings {
    /// The NATS server's URL (`nats://127.0.0.1:4222`); pipelines asking for the
    /// `nats` backend are refused without one.
    pub nats_url: Option<String>,
}

pub(crate) struct Buffers {
    pub(crate) embedded: Arc<EmbeddedBackend>,
    pub(crate) nats: Option<Arc<NatsBackend>>,
    // Read by the agent gateway, which hands the URL to vertex replicas in their
    // assignments; until that lands nothing else needs it.
    #[allow(dead_code)]
    pub(crate) nats_url: Option<String>,
    /// The embedded buffers agents have used, kept open between their calls.
    open: crate::buffer_calls::OpenBuffers,
}

impl Buffers {
    /// Opens the embedded backend under `data_dir/buffers` and connects to NATS when
    /// configured. A NATS server that cannot be reached fails the start: a controller
    /// told to use one should not come up pretending it has it.
    pub(crate) async fn open(
        data_dir: &Path,
        settings: &BufferSettings,
    ) -> Result<Buffers, BufferError> {
        let embedded = Arc::new(EmbeddedBackend::open(data_dir.join("buffers"))?);
        let nats = match &settings.nats_url {
            Some(url) => Some(Arc::new(
                NatsBackend::connect(url, NatsOptions::default()).await?,
            )),
            None => None,
        };
        Ok(Buffers {
            embedded,
            nats,
            nats_url: settings.nats_url.clone(),
            open: Default::default(),
        })
    }

    /// The backend a pipeline's `buffer.backend` names, or why there is none.
    pub(crate) fn backend(&self, kind: BackendKind) -> Result<Arc<dyn BufferBackend>, String> {
        match kind {
            BackendKind::Embedded => Ok(self.embedded.clone()),
            BackendKind::Nats => match &self.nats {
                Some(n) => Ok(n.clone()),
                None => Err(
                    "buffer.backend: nats needs the controller started with --nats URL; this one has no NATS server"
                        .into(),
                ),
            },
        }
    }

    /// The embedded buffer `name`, opened with the settings of the pipeline it belongs
    /// to; kept open for the next call.
    pub(crate) async fn open_embedded(
        &self,
        name: &str,
        spec: &drover_core::pipeline::spec::BufferSpec,
    ) -> Result<Arc<dyn drover_buffer::Buffer>, BufferError> {
        let config = crate::buffer_calls::config_of(spec);
        if let Some(b) = self.open.get(name, &config) {
            return Ok(b);
        }
        let parsed = drover_buffer::remote::parse_name(name)?;
        let buffer = self.embedded.open(&parsed, &config).await?;
        self.open.put(name, config, buffer.clone());
        Ok(buffer)
    }

    /// Drops the handle to a buffer, so the next call opens it afresh.
    pub(crate) fn forget(&self, name: &str) {
        self.open.remove(name);
    }
}
