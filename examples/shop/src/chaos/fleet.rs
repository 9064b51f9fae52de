//! The processes under test: `outbox-relay` sidecars and consumer
//! instances (this binary's `consumer` command), started, killed with
//! SIGKILL and started again, or stopped with SIGTERM. Each one's output
//! goes to a log file of its own in the run's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// How to start one process, kept to start it again.
#[derive(Debug, Clone)]
pub(super) struct Recipe {
    /// A name for logs and the report (`relay-1`, `full-2`).
    pub(super) name: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
}

/// A process of the fleet, perhaps between a kill and its restart.
pub(super) struct Member {
    pub(super) recipe: Recipe,
    child: Option<Child>,
    log: PathBuf,
    /// Times this one was killed.
    pub(super) kills: u32,
}

impl Member {
    /// Starts `recipe`, logging to `<dir>/<name>.log`.
    pub(super) fn start(recipe: Recipe, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{}.log", recipe.name));
        let mut member = Member {
            recipe,
            child: None,
            log,
            kills: 0,
        };
        member.spawn()?;
        Ok(member)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.recipe.program)
            .args(&self.recipe.args)
            .envs(self.recipe.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.recipe.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer would,
    /// and starts it again.
    pub(super) fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kills += 1;
        self.spawn()
    }

    /// Replaces the recipe's value of `flag` (for a changed setting) and
    /// restarts the process gracefully with it.
    pub(super) async fn restart_with(&mut self, flag: &str, value: &str) -> anyhow::Result<()> {
        let args = &mut self.recipe.args;
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.to_owned(),
            None => args.extend([flag.to_owned(), value.to_owned()]),
        }
        self.stop().await?;
        self.spawn()
    }

    /// Checks the process has not exited on its own: a relay or consumer
    /// that gives up is a failure of the run.
    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "{} exited on its own ({status}); see {}",
                self.recipe.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// Stops the process with SIGTERM (graceful), SIGKILL after 30 s.
    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within 30 s of SIGTERM", self.recipe.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
