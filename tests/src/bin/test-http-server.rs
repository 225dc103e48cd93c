//! `test-http-server`: a small server that stands in for a container image in tests. It shows
//! what its process sees: `GET /` greets, `/readyz` answers ok, `/env` lists the environment,
//! `GET|PUT /files/<path>` reads or writes a file (as mounted for this process), `/whoami`
//! asks the API server who the process's KUBECONFIG identifies.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::Path;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/", get(hello))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/env", get(environment))
        .route("/files/{*path}", get(read_file).put(write_file))
        .route("/whoami", get(whoami));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", args.listen);
    let mut terminate = signal(SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            terminate.recv().await;
        })
        .await?;
    Ok(())
}
