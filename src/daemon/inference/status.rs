//! What the daemon says about its engine: the provider it serves on, the one configured,
//! why they differ, and where a background build is. Read by `health`, `/healthz`,
//! `/metrics` and the service status line.

use crate::engine::upgrade::UpgradeState;
use crate::engine::{Placement, Provider};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EngineReport {
    /// The provider serving now.
    pub provider: &'static str,
    /// The provider configured (model.provider).
    pub wanted: &'static str,
    /// serving | building | checking | refused | failed
    pub state: &'static str,
    /// The state in words ("building (3 min)"), and why `provider` is not `wanted`.
    pub detail: Option<String>,
    pub fallback: Option<String>,
    /// Engines swapped in after a background build.
    pub swaps: u64,
}

impl Default for EngineReport {
    fn default() -> Self {
        EngineReport::new(&Placement::default(), Provider::Cpu, None)
    }
}

impl EngineReport {
    /// The report of an engine on `placement` where `wanted` is configured; `note` is
    /// the daemon's reason for not asking for `wanted` (it comes first).
    pub fn new(placement: &Placement, wanted: Provider, note: Option<String>) -> EngineReport {
        let fallback = match (note, placement.fallback.clone()) {
            (Some(a), Some(b)) => Some(format!("{a}; then {b}")),
            (a, b) => a.or(b),
        };
        EngineReport {
            provider: placement.serving.name(),
            wanted: wanted.name(),
            state: "serving",
            detail: None,
            fallback,
            swaps: 0,
        }
    }

    /// Serving on something else than configured.
    pub fn fell_back(&self) -> bool {
        self.provider != self.wanted
    }

    /// Takes a background build's state.
    pub fn building(&mut self, s: &UpgradeState) {
        self.state = match s {
            UpgradeState::Building { .. } => "building",
            UpgradeState::Checking { .. } => "checking",
            UpgradeState::Ready(_) => "serving",
            UpgradeState::Refused(_) => "refused",
            UpgradeState::Failed(_) => "failed",
        };
        self.detail = Some(s.describe());
    }

    /// The new engine serves.
    pub fn swapped(&mut self, placement: &Placement) {
        self.provider = placement.serving.name();
        self.fallback = placement.fallback.clone();
        self.state = "serving";
        self.swaps += 1;
    }

    /// For the service status line: empty when all is as configured.
    pub fn status(&self) -> String {
        let mut s = String::new();
        if self.fell_back() {
            s = format!("engine on {} (not {})", self.provider, self.wanted);
        }
        if self.state != "serving" {
            let detail = self.detail.as_deref().unwrap_or(self.state);
            s = format!(
                "engine: {} {detail}, serving on {}",
                self.wanted, self.provider
            );
        }
        s
    }
}

/// The report, shared between the inference thread and the readers.
#[derive(Debug, Default)]
pub struct EngineStatus(Mutex<EngineReport>);

impl EngineStatus {
    pub fn get(&self) -> EngineReport {
        match self.0.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut EngineReport)) {
        match self.0.lock() {
            Ok(mut r) => f(&mut r),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_status_line_says_what_differs_from_the_configuration() {
        let cpu = Placement::default();
        assert_eq!(EngineReport::new(&cpu, Provider::Cpu, None).status(), "");
        let fell = Placement {
            wanted: Provider::Tensorrt,
            serving: Provider::Cpu,
            fallback: Some("no GPU".into()),
        };
        let mut r = EngineReport::new(&fell, Provider::Tensorrt, None);
        assert!(r.fell_back());
        assert_eq!(r.status(), "engine on cpu (not tensorrt)");
        r.building(&UpgradeState::Building {
            since: Instant::now(),
        });
        assert_eq!(
            r.status(),
            "engine: tensorrt building (0 min), serving on cpu"
        );
        r.swapped(&Placement {
            wanted: Provider::Tensorrt,
            serving: Provider::Tensorrt,
            fallback: None,
        });
        assert_eq!((r.status().as_str(), r.swaps), ("", 1));
    }
}
