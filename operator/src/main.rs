//! `atelier-operator`: one binary, two Deployments. `controller` reconciles Tenants and
//! GenerationJobs; `api` serves the REST API and the web page.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "atelier-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Tenant and GenerationJob controllers.
    Controller(atelier_operator::controllers::ControllerArgs),
    /// Run the HTTP API and web page.
    Api(atelier_operator::api::ApiArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    atelier_operator::telemetry::init_logging();
    match Cli::parse().command {
        Command::Controller(args) => atelier_operator::controllers::run(args).await,
        Command::Api(args) => atelier_operator::api::run(args).await,
    }
}
