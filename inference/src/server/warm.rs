//! Warm-keeping: where the model's weights live, and when they should move.
//!
//! Weights load into host memory at start (`loading` → `host`), go to the device for the first
//! job (`device`) and stay there while jobs keep coming, so consecutive jobs skip the transfer.
//! After `idle_offload` without any job they return to host memory, freeing the GPU for other
//! tenants' pods without paying for a reload from disk.
//!
//! This is a pure state machine: it is told the time and what happened, and answers which move
//! the caller should make. The generation worker performs the moves; tests drive it with
//! made-up instants.

use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Loading,
    Host,
    Device,
}

impl ModelState {
    pub const ALL: [ModelState; 3] = [ModelState::Loading, ModelState::Host, ModelState::Device];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Host => "host",
            ModelState::Device => "device",
        }
    }
}

/// A transfer of the weights the caller has to perform, then confirm with [`WarmKeeper::moved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    ToDevice,
    ToHost,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the model is still loading")]
    Loading,
    #[error("{0} job(s) are using the model")]
    Busy(u32),
}

#[derive(Debug)]
pub struct WarmKeeper {
    state: ModelState,
    idle_offload: Duration,
    active_jobs: u32,
    /// When the last job finished (or the model got to the device without a job); the idle
    /// timer runs from here while no job is active.
    idle_since: Instant,
}

impl WarmKeeper {
    pub fn new(idle_offload: Duration, now: Instant) -> Self {
        WarmKeeper {
            state: ModelState::Loading,
            idle_offload,
            active_jobs: 0,
            idle_since: now,
        }
    }

    pub fn state(&self) -> ModelState {
        self.state
    }

    /// The weights are in host memory.
    pub fn loaded(&mut self, now: Instant) {
        debug_assert_eq!(self.state, ModelState::Loading);
        self.state = ModelState::Host;
        self.idle_since = now;
    }

    /// A job is about to generate; the returned move must happen first.
    pub fn job_started(&mut self) -> Option<Move> {
        self.active_jobs += 1;
        (self.state == ModelState::Host).then_some(Move::ToDevice)
    }

    pub fn job_finished(&mut self, now: Instant) {
        debug_assert!(self.active_jobs > 0);
        self.active_jobs = self.active_jobs.saturating_sub(1);
        if self.active_jobs == 0 {
            self.idle_since = now;
        }
    }

    /// A move returned by this machine has completed.
    pub fn moved(&mut self, to: Move, now: Instant) {
        self.state = match to {
            Move::ToDevice => ModelState::Device,
            Move::ToHost => ModelState::Host,
        };
        if self.active_jobs == 0 {
            self.idle_since = now;
        }
    }

    /// When [`WarmKeeper::poll`] will next have something to do, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        (self.state == ModelState::Device && self.active_jobs == 0)
            .then(|| self.idle_since + self.idle_offload)
    }

    /// The idle offload, once it is due.
    pub fn poll(&self, now: Instant) -> Option<Move> {
        self.deadline()
            .filter(|&due| now >= due)
            .map(|_| Move::ToHost)
    }

    /// An operator's "free the GPU now": allowed only while no job needs the device.
    pub fn offload_now(&self) -> Result<Option<Move>, Error> {
        match self.state {
            ModelState::Loading => Err(Error::Loading),
            _ if self.active_jobs > 0 => Err(Error::Busy(self.active_jobs)),
            ModelState::Host => Ok(None),
            ModelState::Device => Ok(Some(Move::ToHost)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(300);

    fn loaded_keeper(t0: Instant) -> WarmKeeper {
        let mut warm = WarmKeeper::new(IDLE, t0);
        assert_eq!(warm.state(), ModelState::Loading);
        assert_eq!(warm.deadline(), None);
        warm.loaded(t0);
        warm
    }

    #[test]
    fn first_job_moves_to_device_and_idle_moves_back() {
        let t0 = Instant::now();
        let mut warm = loaded_keeper(t0);
        assert_eq!(warm.state(), ModelState::Host);
        // Sitting on the host is the resting state: no timer.
        assert_eq!(warm.deadline(), None);
        assert_eq!(warm.poll(t0 + IDLE * 10), None);

        assert_eq!(warm.job_started(), Some(Move::ToDevice));
        warm.moved(Move::ToDevice, t0 + Duration::from_secs(1));
        assert_eq!(warm.state(), ModelState::Device);
        // A running job never gets offloaded, however long it takes.
        assert_eq!(warm.deadline(), None);
        assert_eq!(warm.poll(t0 + IDLE * 10), None);

        let done = t0 + Duration::from_secs(60);
        warm.job_finished(done);
        assert_eq!(warm.deadline(), Some(done + IDLE));
        assert_eq!(warm.poll(done + IDLE - Duration::from_millis(1)), None);
        assert_eq!(warm.poll(done + IDLE), Some(Move::ToHost));
        warm.moved(Move::ToHost, done + IDLE);
        assert_eq!(warm.state(), ModelState::Host);
        assert_eq!(warm.deadline(), None);
    }

    #[test]
    fn jobs_within_idle_window_keep_the_model_on_device() {
        let t0 = Instant::now();
        let mut warm = loaded_keeper(t0);
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
        warm.moved(Move::ToDevice, t0);
        warm.job_finished(t0 + Duration::from_secs(10));

        // The next job comes before the offload: no move, and the timer restarts after it.
        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(warm.job_started(), None);
        assert_eq!(warm.poll(t0 + Duration::from_secs(400)), None);
        warm.job_finished(t1);
        assert_eq!(warm.poll(t0 + Duration::from_secs(400)), None);
        assert_eq!(warm.poll(t1 + IDLE), Some(Move::ToHost));
    }

    #[test]
    fn overlapping_jobs_count_until_the_last_finishes() {
        let t0 = Instant::now();
        let mut warm = loaded_keeper(t0);
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
        warm.moved(Move::ToDevice, t0);
        assert_eq!(warm.job_started(), None);
        warm.job_finished(t0 + Duration::from_secs(1));
        assert_eq!(warm.deadline(), None);
        assert_eq!(warm.offload_now(), Err(Error::Busy(1)));
        warm.job_finished(t0 + Duration::from_secs(2));
        assert_eq!(warm.deadline(), Some(t0 + Duration::from_secs(2) + IDLE));
    }

    #[test]
    fn manual_offload() {
        let t0 = Instant::now();
        let mut warm = WarmKeeper::new(IDLE, t0);
        assert_eq!(warm.offload_now(), Err(Error::Loading));
        warm.loaded(t0);
        assert_eq!(warm.offload_now(), Ok(None));
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
        warm.moved(Move::ToDevice, t0);
        assert_eq!(warm.offload_now(), Err(Error::Busy(1)));
        warm.job_finished(t0);
        assert_eq!(warm.offload_now(), Ok(Some(Move::ToHost)));
        warm.moved(Move::ToHost, t0);
        assert_eq!(warm.state(), ModelState::Host);
        // And the next job brings it back.
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
    }

    #[test]
    fn failed_move_to_device_keeps_host_state() {
        let t0 = Instant::now();
        let mut warm = loaded_keeper(t0);
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
        // The caller could not move (e.g. out of device memory): it does not confirm, the job
        // fails, and the model stays on the host with no timer.
        warm.job_finished(t0);
        assert_eq!(warm.state(), ModelState::Host);
        assert_eq!(warm.deadline(), None);
        assert_eq!(warm.job_started(), Some(Move::ToDevice));
    }
}
