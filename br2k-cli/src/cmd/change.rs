//! The commands that change a record: scale, pause, resume, stop, rollback, grant, revoke.

use std::time::Duration;

use br2k_core::{Account, Registry, Role, ServiceId, ServiceRecord, ServiceState};
use serde_json::json;

use super::status::state_name;
use crate::args::*;
use crate::error::{CliResult, EXIT_OK, ForService};
use crate::{chain, current, kube, print_json, progress, service_id};

type ChangeFut<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = br2k_core::Result<ServiceRecord>> + Send + 'a>,
>;

pub(crate) async fn change<F>(cli: &Cli, id: &ServiceId, wait: &WaitArgs, f: F) -> CliResult<u8>
where
    F: for<'a> FnOnce(&'a br2k_chain::ChainRegistry) -> ChangeFut<'a>,
{
    let (_, ctx) = current(cli)?;
    let reg = chain::connect(&ctx, true).await?;
    let rec = f(&reg).await.for_service(id)?;
    let mut waited = None;
    if wait.wait {
        let client = ctx.kube().await?;
        waited = Some(
            kube::wait(
                &client,
                &ctx.namespace,
                &rec,
                Duration::from_secs(wait.timeout),
                progress(),
            )
            .await?,
        );
    }
    if cli.output == Output::Json {
        print_json(&json!({
            "service": id.as_str(),
            "version": rec.version,
            "state": state_name(rec.state),
            "replicas": rec.replicas,
            "block": rec.as_of,
            "waited_ms": waited.map(|d| d.as_millis() as u64),
        }));
    } else {
        println!(
            "{id}: v{} {} with {} replicas{}",
            rec.version,
            rec.state,
            rec.replicas,
            waited
                .map(|d| format!("; live in {} ms", d.as_millis()))
                .unwrap_or_default()
        );
    }
    Ok(EXIT_OK)
}

pub(crate) async fn state_cmd(
    cli: &Cli,
    service: &str,
    to: ServiceState,
    wait: &WaitArgs,
) -> CliResult<u8> {
    let id = service_id(service)?;
    change(cli, &id, wait, |r| {
        let id = id.clone();
        Box::pin(async move { r.set_state(&id, to).await })
    })
    .await
}

pub(crate) async fn roles(
    cli: &Cli,
    service: &str,
    account: &str,
    role: RoleArg,
    grant: bool,
) -> CliResult<u8> {
    let id = service_id(service)?;
    let (_, ctx) = current(cli)?;
    let reg = chain::connect(&ctx, true).await?;
    let role = match role {
        RoleArg::Operator => Role::Operator,
        RoleArg::Replica => Role::Replica,
    };
    let acc = Account(account.to_lowercase());
    if grant {
        reg.grant(&id, &acc, role).await.for_service(&id)?;
    } else {
        reg.revoke(&id, &acc, role).await.for_service(&id)?;
    }
    let verb = if grant { "granted" } else { "revoked" };
    if cli.output == Output::Json {
        print_json(
            &json!({"service": id.as_str(), "account": acc.0, "role": format!("{role:?}").to_lowercase(), "result": verb}),
        );
    } else {
        println!("{verb} {:?} on {id} for {}", role, acc.0);
    }
    Ok(EXIT_OK)
}
