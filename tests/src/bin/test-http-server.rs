//! `test-http-server`: a small server that stands in for a container image in tests. It shows
//! what its process sees: `GET /` greets, `/readyz` answers ok, `/env` lists the environment,
//! `GET|PUT /files/<path>` reads or writes a file (as mounted for this process), `/whoami`
//! asks the API server who the process's KUBECONFIG identifies, `/peer` is the address the
//! request came from, and `/relay/<host:port/path>` GETs `http://<host:port/path>` from this
//! process's network (502 with the error when that fails), to probe what a pod can reach.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path};
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
struct Args {
    /// Address to listen on, e.g. `$(POD_IP):8080`.
    #[arg(long)]
    listen: SocketAddr,
}

type Reply = Result<String, (StatusCode, String)>;

fn failed(error: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
}

async fn hello() -> String {
    format!(
        "hello from {}\n",
        std::env::var("HOSTNAME").unwrap_or_default()
    )
}

async fn environment() -> axum::Json<BTreeMap<String, String>> {
    axum::Json(std::env::vars().collect())
}

async fn read_file(Path(path): Path<String>) -> Reply {
    std::fs::read_to_string(format!("/{path}")).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => (StatusCode::NOT_FOUND, format!("{error}\n")),
        _ => failed(error),
    })
}

async fn write_file(Path(path): Path<String>, body: String) -> Reply {
    std::fs::write(format!("/{path}"), body).map_err(failed)?;
    Ok("written\n".into())
}

async fn whoami() -> Reply {
    let client = Client::try_default().await.map_err(failed)?;
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(failed)?;
    let user = review
        .status
        .and_then(|status| status.user_info)
        .and_then(|user| user.username);
    Ok(user.unwrap_or_default())
}

async fn peer(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    format!("{}\n", peer.ip())
}

async fn relay(Path(target): Path<String>) -> Reply {
    let unreachable = |error: reqwest::Error| (StatusCode::BAD_GATEWAY, format!("{error:#}\n"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(failed)?;
    let response = client
        .get(format!("http://{target}"))
        .send()
        .await
        .map_err(unreachable)?;
    response.text().await.map_err(unreachable)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/", get(hello))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/env", get(environment))
        .route("/files/{*path}", get(read_file).put(write_file))
        .route("/whoami", get(whoami))
        .route("/peer", get(peer))
        .route("/relay/{*target}", get(relay));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", args.listen);
    let mut terminate = signal(SignalKind::terminate())?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        terminate.recv().await;
    })
    .await?;
    Ok(())
}
