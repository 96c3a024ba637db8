//! `tctl requests ls | approve | deny`: users' access requests (`tsh request create`). An
//! approval lasts `--ttl`; the user's certificates issued meanwhile carry the roles and end
//! with it.

use edgeport_net::clock::now_secs;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{AccessReview, Request, Response};

use super::cli::{Format, FormatArgs};
use super::connect::Session;
use super::output::{json_list, print_as};

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let all = match s.call(Request::AccessRequestList).await? {
        Response::AccessRequests(v) => v,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json | Format::Yaml => {
            print_as(a.format, &json_list(&all, crate::schema::access_request))
        }
        Format::Text => {
            crate::schema::access_request_table(&all, now_secs()).print();
            Ok(())
        }
    }
}

pub async fn review(
    s: &mut Session,
    id: String,
    approve: bool,
    reason: Option<String>,
    ttl_secs: u64,
) -> anyhow::Result<()> {
    let review = AccessReview {
        id,
        approve,
        reason: reason.unwrap_or_default(),
        ttl_secs,
    };
    match s.call(Request::AccessRequestReview(review)).await? {
        Response::AccessRequests(v) => {
            for r in v {
                if approve {
                    crate::outln!(
                        "access request {} approved: {} gets {} until {}",
                        r.id,
                        r.user,
                        r.roles.join(","),
                        edgeport_proto::util::format_time(r.expires)
                    );
                } else {
                    crate::outln!("access request {} denied", r.id);
                }
            }
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
