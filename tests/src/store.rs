//! One store under test: its hub (reaching the broker through a fault proxy) and its terminals
//! (reaching the hub through another), as real processes that can be cut off, killed and
//! restarted. The processes do not know they are being tested: they see only TCP.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{free_port, proxy::FaultProxy, wait_for_metric, Service};

/// A store: hub, terminals, and the two links the test controls.
pub struct StoreSite {
    /// The store id.
    pub store_id: String,
    /// The hub process.
    pub hub: Service,
    /// The terminals, each with its frames directory.
    pub edges: Vec<(Service, PathBuf)>,
    /// Hub <-> broker.
    pub uplink: FaultProxy,
    /// Terminals <-> hub.
    pub downlink: FaultProxy,
    hub_args: Vec<String>,
    hub_data_dir: PathBuf,
    /// The file the hub's clock takes its offset from while it runs.
    clock_offset_file: PathBuf,
}

impl StoreSite {
    /// Starts a hub for `store_id` with its data under `dir`, reaching the broker at
    /// `broker_port` through a proxy, plus `terminals` edges; `hub_extra` are more `--set`s.
    pub fn start(
        dir: &Path,
        store_id: &str,
        broker_port: u16,
        terminals: usize,
        hub_extra: &[String],
    ) -> anyhow::Result<Self> {
        let uplink = FaultProxy::start(([127, 0, 0, 1], broker_port).into())?;
        let hub_data_dir = dir.join(format!("hub-{store_id}"));
        let zenoh_port = free_port();
        let mut hub_args = vec![
            format!("store_id={store_id}"),
            format!("data_dir={hub_data_dir:?}"),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", uplink.port),
            "mqtt.keep_alive_seconds=1".into(),
            "mqtt.reconnect_delay_ms=100".into(),
            "cloud_timeout_ms=1500".into(),
            "offline.drain_interval_ms=500".into(),
        ];
        hub_args.extend(hub_extra.iter().cloned());
        let clock_offset_file = dir.join(format!("clock-offset-{store_id}"));
        let hub = Service::start_with_env(
            "facepay-hub",
            &hub_args,
            &[clock_offset_env(&clock_offset_file)],
        )
        .context("hub starts")?;
        let downlink = FaultProxy::start(([127, 0, 0, 1], zenoh_port).into())?;
        let mut edges = Vec::new();
        for n in 0..terminals {
            let frames = crate::spool(&format!("frames-{store_id}-{n}"));
            let edge = Service::start(
                "facepay-edge",
                &[
                    format!("store_id={store_id}"),
                    format!("terminal_id=till-{n}"),
                    "register_listen=127.0.0.1:0".into(),
                    "scan_timeout_ms=3000".into(),
                    format!("frames_dir={frames:?}"),
                    format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", downlink.port),
                ],
            )
            .context("edge starts")?;
            edges.push((edge, frames));
        }
        Ok(StoreSite {
            store_id: store_id.to_owned(),
            hub,
            edges,
            uplink,
            downlink,
            hub_args,
            hub_data_dir,
            clock_offset_file,
        })
    }

    /// Steps the running hub's clock to `offset_ms` off the system clock (0: right again),
    /// through its offset file; it holds over restarts until stepped again. Returns once the
    /// file is written (the hub reads it within [`clock::OFFSET_FILE_POLL`]).
    pub fn set_hub_clock_offset(&self, offset_ms: i64) -> anyhow::Result<()> {
        let staged = self.clock_offset_file.with_extension("new");
        std::fs::write(&staged, offset_ms.to_string())?;
        // Renamed into place: the hub never reads half a number.
        std::fs::rename(&staged, &self.clock_offset_file)?;
        Ok(())
    }

    /// The hub's data directory (its journal is `journal/` in it).
    pub fn hub_data_dir(&self) -> &Path {
        &self.hub_data_dir
    }

    /// The key the hub signs offline approvals with.
    pub fn hub_key(&self) -> String {
        self.hub.ready.get("hub_key").cloned().unwrap_or_default()
    }

    /// The hub's `/metrics` address.
    pub fn hub_http(&self) -> SocketAddr {
        self.hub.http_addr
    }

    /// Kills the hub (SIGKILL) and starts it again on the same data and ports.
    pub fn restart_hub(&mut self) -> anyhow::Result<()> {
        self.restart_hub_with_env(&[])
    }

    /// [`StoreSite::restart_hub`] with environment variables for the new hub process (failpoints,
    /// a clock offset).
    pub fn restart_hub_with_env(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        self.hub.kill();
        // The journal's lock and the Zenoh port are released when the process is gone; a
        // retry covers the moment the kernel takes.
        let mut tries = 0;
        loop {
            let mut env = env.to_vec();
            env.push(clock_offset_env(&self.clock_offset_file));
            match Service::start_with_env("facepay-hub", &self.hub_args, &env) {
                Ok(hub) => {
                    self.hub = hub;
                    return Ok(());
                }
                Err(e) if tries > 10 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
    }

    /// Waits until the hub is connected to the broker (1) or not (0).
    pub fn wait_connected(&self, up: bool, timeout: Duration) -> anyhow::Result<()> {
        wait_for_metric(
            self.hub.http_addr,
            "facepay_hub_broker_connected",
            if up { 1.0 } else { 0.0 },
            timeout,
        )
    }

    /// Reads one of the hub's metrics.
    pub fn hub_metric(&self, name: &str) -> Option<f64> {
        crate::get_text(&format!("http://{}/metrics", self.hub.metrics_addr))
            .ok()
            .and_then(|page| crate::metric_value(&page, name))
    }
}

fn clock_offset_env(file: &Path) -> (String, String) {
    (
        clock::OFFSET_FILE_ENV.to_owned(),
        file.to_string_lossy().into_owned(),
    )
}
