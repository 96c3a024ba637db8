//! tctl: the administrator tool (auth export/sign, users, tokens, devices, locks).
//!
//! Every command opens one mutual-TLS connection to the authority's RPC port with the
//! administrator identity (`DATA_DIR/admin.identity` written by the authority), sends one or
//! two requests and prints the answer as an aligned table or as JSON. Errors are one line,
//! `error: ...`, and exit status 1.

mod audit;
mod auth;
mod cli;
mod connect;
mod devices;
mod gateways;
mod locks;
mod output;
mod requests;
mod roles;
mod rotate;
mod sso;
mod status;
mod tokens;
mod update;
mod users;

use std::process::ExitCode;

use clap::Parser;

pub use cli::Cli;
use cli::{
    AuditCmd, AuthCmd, Command, DevicesCmd, FormatArgs, GatewaysCmd, GetKind, LocksCmd,
    RequestsCmd, RolesCmd, SsoCmd, TokensCmd, UsersCmd,
};
use connect::Session;

/// The whole program: parses the command line, runs it, prints errors as one line.
pub fn main() -> ExitCode {
    edgeport_proto::tls::install_crypto_provider();
    init_logging();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain on one line: "what failed: why".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr and are off unless RUST_LOG asks for them: tctl's output is for people
/// and scripts, not a log.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // The commands that need no authority.
    match &cli.command {
        Command::Version(a) => {
            crate::shared::print_version("tctl", a.format == cli::Format::Json);
            return Ok(());
        }
        Command::Completion(a) => {
            crate::shared::print_completion::<Cli>("tctl", a.shell);
            return Ok(());
        }
        _ => {}
    }
    let mut s = Session::open(&cli.auth, cli.identity.as_deref()).await?;
    let result = match cli.command {
        Command::Status(a) => status::status(&mut s, a).await,
        Command::Auth(AuthCmd::Export(a)) => auth::export(&mut s, a).await,
        Command::Auth(AuthCmd::Sign(a)) => auth::sign(&mut s, a).await,
        Command::Auth(AuthCmd::Rotate(a)) => rotate::rotate(&mut s, a).await,
        Command::Users(UsersCmd::Add(a)) => users::add(&mut s, a).await,
        Command::Users(UsersCmd::Ls(a)) => users::list(&mut s, a).await,
        Command::Users(UsersCmd::Rm { name }) => users::remove(&mut s, name).await,
        Command::Users(UsersCmd::Update(a)) => users::update(&mut s, a).await,
        Command::Tokens(TokensCmd::Add(a)) => tokens::add(&mut s, a).await,
        Command::Tokens(TokensCmd::Ls(a)) => tokens::list(&mut s, a).await,
        Command::Tokens(TokensCmd::Rm { id }) => tokens::remove(&mut s, id).await,
        Command::Devices(DevicesCmd::Ls(a)) => devices::list(&mut s, a).await,
        Command::Devices(DevicesCmd::Rm { id }) => devices::remove(&mut s, id).await,
        Command::Devices(DevicesCmd::Usage(a)) => devices::usage(&mut s, a).await,
        Command::Devices(DevicesCmd::Set(a)) => devices::set(&mut s, a).await,
        Command::Devices(DevicesCmd::Update(a)) => update::run(&mut s, a).await,
        Command::Gateways(GatewaysCmd::Ls(a)) => gateways::list(&mut s, a).await,
        Command::Gateways(GatewaysCmd::Rm { id }) => gateways::remove(&mut s, id).await,
        Command::Lock(a) => locks::lock(&mut s, a).await,
        Command::Unlock(a) | Command::Locks(LocksCmd::Rm(a)) => locks::unlock(&mut s, a).await,
        Command::Locks(LocksCmd::Ls(a)) => locks::list(&mut s, a).await,
        Command::Roles(RolesCmd::Add(a)) => roles::add(&mut s, a).await,
        Command::Roles(RolesCmd::Update(a)) => roles::update(&mut s, a).await,
        Command::Roles(RolesCmd::Ls(a)) => roles::list(&mut s, a).await,
        Command::Roles(RolesCmd::Rm { name }) => roles::remove(&mut s, name).await,
        Command::Requests(RequestsCmd::Ls(a)) => requests::list(&mut s, a).await,
        Command::Requests(RequestsCmd::Approve { id, reason, ttl }) => {
            requests::review(&mut s, id, true, reason, ttl).await
        }
        Command::Requests(RequestsCmd::Deny { id, reason }) => {
            requests::review(&mut s, id, false, reason, 0).await
        }
        Command::Audit(AuditCmd::Search(a)) => audit::search(&mut s, a).await,
        Command::Audit(AuditCmd::Verify(a)) => audit::verify(&mut s, a).await,
        Command::Sso(SsoCmd::Map(a)) => sso::map(&mut s, a).await,
        Command::Sso(SsoCmd::Ls(a)) => sso::list(&mut s, a).await,
        Command::Sso(SsoCmd::Unmap { group }) => sso::unmap(&mut s, group).await,
        Command::Sso(SsoCmd::Connectors(c)) => sso::connectors(&mut s, c).await,
        Command::Get(g) => {
            let a = FormatArgs { format: g.format };
            match g.kind {
                GetKind::Users => users::list(&mut s, a).await,
                GetKind::Roles => roles::list(&mut s, a).await,
                GetKind::Nodes => devices::list(&mut s, a).await,
                GetKind::Tokens => tokens::list(&mut s, a).await,
                GetKind::Gateways => gateways::list(&mut s, a).await,
                GetKind::Locks => locks::list(&mut s, a).await,
            }
        }
        Command::Version(_) | Command::Completion(_) => Ok(()),
    };
    s.close().await;
    result
}
