//! The built `atelier-inference` binary: its subcommands, flags from the environment, and a
//! graceful stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_atelier-inference");

fn make_tiny_model(dir: &Path) {
    let status = Command::new(BIN)
        .args(["make-tiny-model", "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Starts `serve` with every setting from the environment, listening on a port of its choice;
/// returns the child and its address, read from its JSON log.
fn spawn_server(model: &Path, outputs: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("ATELIER_MODEL_DIR", model)
        .env("ATELIER_OUTPUTS_DIR", outputs)
        .env("ATELIER_LISTEN", "127.0.0.1:0")
        .env("ATELIER_IDLE_OFFLOAD", "1h")
        .env("ATELIER_SHUTDOWN_GRACE", "60s")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("server: {line}");
            let Ok(log) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if log["fields"]["message"] == "listening" {
                let _ = addr_tx.send(log["fields"]["addr"].as_str().unwrap().to_owned());
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server logs its address");
    (child, addr)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < within, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn generate_writes_a_png() {
    let model = tempfile::tempdir().unwrap();
    make_tiny_model(model.path());
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("fox.png");
    let status = Command::new(BIN)
        .args([
            "generate",
            "--prompt",
            "a red fox",
            "--seed",
            "3",
            "--width",
            "256",
            "--height",
            "256",
        ])
        .args(["--steps", "2", "--model-dir"])
        .arg(model.path())
        .arg("--out")
        .arg(&png)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_finishes_the_running_job_on_sigterm() {
    let model = tempfile::tempdir().unwrap();
    make_tiny_model(model.path());
    let outputs = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(model.path(), outputs.path());
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    let started = Instant::now();
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(started.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"id": "bin-1", "user": "alice", "prompt": "a fox", "width": 256, "height": 256,
                      "steps": 4, "seed": 1});
    let response = http
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    loop {
        let status: Value = http
            .get(format!("{base}/v1/jobs/bin-1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] != "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(120)))
            .await
            .unwrap();
    assert!(status.success(), "{status}");
    // The job that was running when SIGTERM came was finished, not dropped.
    let written: Vec<_> = std::fs::read_dir(outputs.path().join("alice"))
        .unwrap()
        .collect();
    assert_eq!(written.len(), 2, "a PNG and its metadata");
}

/// Runs the binary to its exit and returns whether it succeeded, with its stderr.
fn run_to_exit(command: &mut Command) -> (bool, String) {
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[cfg(not(feature = "cuda"))]
#[test]
fn asking_for_cuda_in_a_build_without_it_fails_at_start_naming_cuda() {
    let model = tempfile::tempdir().unwrap();
    make_tiny_model(model.path());
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("fox.png");
    let (ok, stderr) = run_to_exit(
        Command::new(BIN)
            .args([
                "generate", "--device", "cuda", "--prompt", "a fox", "--seed", "1",
            ])
            .args([
                "--width",
                "256",
                "--height",
                "256",
                "--steps",
                "1",
                "--model-dir",
            ])
            .arg(model.path())
            .arg("--out")
            .arg(&png),
    );
    assert!(!ok, "generate --device cuda succeeded: {stderr}");
    assert!(
        stderr.contains("CUDA") && stderr.contains("cuda:0"),
        "{stderr}"
    );
    assert!(!png.exists(), "no image may come out of a silent CPU run");

    // `serve` with the device from the environment, as the tenant's pod passes it.
    let outputs = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_to_exit(
        Command::new(BIN)
            .arg("serve")
            .env("ATELIER_DEVICE", "cuda:1")
            .env("ATELIER_MODEL_DIR", model.path())
            .env("ATELIER_OUTPUTS_DIR", outputs.path())
            .env("ATELIER_LISTEN", "127.0.0.1:0"),
    );
    assert!(
        !ok,
        "serve with ATELIER_DEVICE=cuda:1 kept running: {stderr}"
    );
    assert!(
        stderr.contains("CUDA") && stderr.contains("cuda:1"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_device_is_refused_by_name() {
    let (ok, stderr) = run_to_exit(Command::new(BIN).args([
        "generate",
        "--device",
        "tpu",
        "--prompt",
        "x",
        "--seed",
        "1",
        "--model-dir",
        "/m",
        "--out",
        "/o.png",
    ]));
    assert!(!ok);
    assert!(
        stderr.contains("\"tpu\"") && stderr.contains("cuda:N"),
        "{stderr}"
    );
}
