//! Hand-written proptest strategies for every message of the wire protocol: the tunnel, join
//! and dial enums (`tunnel`), the RPC enums (`rpc`) and what they carry. Used by the
//! round-trip properties (`tests/roundtrip.rs`) and to make the fuzzers' seed corpus
//! (`tests/fuzz_entries.rs`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use edgeport_proto::audit::*;
use edgeport_proto::identity::CaBundle;
use edgeport_proto::rpc::*;
use edgeport_proto::ticket::DialTicket;
use edgeport_proto::tunnel::*;
use proptest::collection::{btree_map, vec};
use proptest::option::of;
use proptest::prelude::*;

pub fn s() -> impl Strategy<Value = String> + Clone {
    prop_oneof![3 => "[a-z0-9._/-]{0,12}", 1 => ".{0,8}"]
}
pub fn vs() -> impl Strategy<Value = Vec<String>> + Clone {
    vec(s(), 0..3)
}
pub fn os() -> impl Strategy<Value = Option<String>> + Clone {
    of(s())
}
pub fn ovs() -> impl Strategy<Value = Option<Vec<String>>> + Clone {
    of(vs())
}
pub fn labels() -> impl Strategy<Value = BTreeMap<String, String>> + Clone {
    btree_map(s(), s(), 0..3)
}
pub fn rules() -> impl Strategy<Value = BTreeMap<String, Vec<String>>> + Clone {
    btree_map(s(), vs(), 0..3)
}
pub fn bytes() -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(any::<u8>(), 0..40)
}
pub fn ob() -> impl Strategy<Value = Option<Vec<u8>>> + Clone {
    of(bytes())
}

pub fn error_kind() -> impl Strategy<Value = ErrorKind> + Clone {
    prop::sample::select(vec![
        ErrorKind::Denied,
        ErrorKind::BadCredentials,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Invalid,
        ErrorKind::Expired,
        ErrorKind::Locked,
        ErrorKind::Internal,
        ErrorKind::SecondFactorRequired,
        ErrorKind::SecondFactorEnroll,
        ErrorKind::GatewayRevoked,
    ])
}
pub fn rpc_error() -> impl Strategy<Value = RpcError> + Clone {
    (error_kind(), s()).prop_map(|(kind, message)| RpcError { kind, message })
}
pub fn transport() -> impl Strategy<Value = Transport> + Clone {
    prop_oneof![Just(Transport::Quic), Just(Transport::Tcp)]
}
pub fn service() -> impl Strategy<Value = Service> + Clone {
    prop_oneof![
        Just(Service::Echo),
        Just(Service::Ssh),
        Just(Service::Kube),
        "[a-z0-9._-]{1,12}".prop_map(Service::Target),
        Just(Service::Update),
    ]
}
pub fn token_kind() -> impl Strategy<Value = TokenKind> + Clone {
    prop_oneof![Just(TokenKind::Device), Just(TokenKind::Gateway)]
}
pub fn cas() -> impl Strategy<Value = CaBundle> + Clone {
    (s(), s(), s(), s(), s(), s()).prop_map(
        |(cluster, user_ca, host_ca, x509_ca_pem, ca_pin, signature)| CaBundle {
            cluster,
            user_ca,
            host_ca,
            x509_ca_pem,
            ca_pin,
            signature,
        },
    )
}
pub fn ticket() -> impl Strategy<Value = DialTicket> + Clone {
    (bytes(), bytes()).prop_map(|(claims, signature)| DialTicket { claims, signature })
}
pub fn user_certs() -> impl Strategy<Value = UserCerts> + Clone {
    (s(), s(), s(), cas(), vs(), vs(), vs(), any::<u64>()).prop_map(
        |(user, ssh_cert, x509_cert_pem, cas, logins, kube_groups, kube_users, valid_before)| {
            UserCerts {
                user,
                ssh_cert,
                x509_cert_pem,
                cas,
                logins,
                kube_groups,
                kube_users,
                valid_before,
            }
        },
    )
}
pub fn device_certs() -> impl Strategy<Value = DeviceCerts> + Clone {
    (s(), labels(), s(), s(), cas(), any::<u64>()).prop_map(
        |(device_id, labels, host_cert, x509_cert_pem, cas, valid_before)| DeviceCerts {
            device_id,
            labels,
            host_cert,
            x509_cert_pem,
            cas,
            valid_before,
        },
    )
}
pub fn gateway_certs() -> impl Strategy<Value = GatewayCerts> + Clone {
    (s(), s(), cas(), any::<u64>()).prop_map(|(gateway_id, x509_cert_pem, cas, valid_before)| {
        GatewayCerts {
            gateway_id,
            x509_cert_pem,
            cas,
            valid_before,
        }
    })
}
pub fn device_info() -> impl Strategy<Value = DeviceInfo> + Clone {
    (
        (s(), labels(), any::<bool>(), of(transport()), s(), s(), s()),
        (
            of(any::<u32>()),
            any::<u64>(),
            os(),
            os(),
            any::<u64>(),
            os(),
        ),
        (of(any::<u32>()), any::<u32>()),
    )
        .prop_map(
            |(
                (id, labels, online, transport, address, version, arch),
                (rtt_ms, last_seen, last_disconnect_reason, gateway, joined_at, kube_cluster),
                (loss_permille, address_changes_24h),
            )| DeviceInfo {
                id,
                labels,
                online,
                transport,
                address,
                version,
                arch,
                rtt_ms,
                last_seen,
                last_disconnect_reason,
                gateway,
                joined_at,
                kube_cluster,
                loss_permille,
                address_changes_24h,
            },
        )
}
pub fn devices() -> impl Strategy<Value = Vec<DeviceInfo>> + Clone {
    vec(device_info(), 0..3)
}
pub fn login_request() -> impl Strategy<Value = LoginRequest> + Clone {
    (s(), s(), os(), s(), any::<u64>(), s(), os(), os()).prop_map(
        |(user, secret, new_password, ssh_public_key, ttl_secs, client_addr, otp, totp_enroll)| {
            LoginRequest {
                user,
                secret,
                new_password,
                ssh_public_key,
                ttl_secs,
                client_addr,
                otp,
                totp_enroll,
            }
        },
    )
}
pub fn join_device_request() -> impl Strategy<Value = JoinDeviceRequest> + Clone {
    (s(), os(), labels(), s(), s(), s(), s()).prop_map(
        |(token, requested_id, labels, ssh_public_key, version, arch, remote_addr)| {
            JoinDeviceRequest {
                token,
                requested_id,
                labels,
                ssh_public_key,
                version,
                arch,
                remote_addr,
            }
        },
    )
}
pub fn audit_event() -> impl Strategy<Value = AuditEvent> + Clone {
    (
        any::<u64>(),
        s(),
        any::<u64>(),
        s(),
        s(),
        s(),
        s(),
        labels(),
    )
        .prop_map(
            |(seq, prev_hash, time_ms, kind, session_id, user, login, fields)| AuditEvent {
                seq,
                prev_hash,
                time_ms,
                kind,
                session_id,
                user,
                login,
                fields,
            },
        )
}
pub fn audit_batch() -> impl Strategy<Value = AuditBatch> + Clone {
    (vec(audit_event(), 0..3), bytes())
        .prop_map(|(events, signature)| AuditBatch { events, signature })
}
pub fn audit_ack() -> impl Strategy<Value = AuditAck> + Clone {
    (any::<u64>(), s(), os(), bytes()).prop_map(|(acked_seq, last_hash, error, signature)| {
        AuditAck {
            acked_seq,
            last_hash,
            error,
            signature,
        }
    })
}
pub fn recording_info() -> impl Strategy<Value = RecordingInfo> + Clone {
    (s(), s(), s(), s(), any::<u64>(), any::<u64>(), s()).prop_map(
        |(session_id, device, user, login, started_ms, bytes, user_id)| RecordingInfo {
            session_id,
            device,
            user,
            login,
            started_ms,
            bytes,
            user_id,
        },
    )
}
pub fn stream_header() -> impl Strategy<Value = StreamHeader> + Clone {
    (service(), os(), s(), s(), vs(), vs(), of(ticket()), os()).prop_map(
        |(service, user, session_id, client_addr, kube_groups, kube_users, ticket, via)| {
            StreamHeader {
                service,
                user,
                session_id,
                client_addr,
                kube_groups,
                kube_users,
                ticket,
                via,
            }
        },
    )
}
pub fn hello() -> impl Strategy<Value = Hello> + Clone {
    (s(), labels(), s(), s(), os()).prop_map(|(device_id, labels, version, arch, kube_cluster)| {
        Hello {
            device_id,
            labels,
            version,
            arch,
            kube_cluster,
        }
    })
}
pub fn lock_target() -> impl Strategy<Value = LockTarget> + Clone {
    prop_oneof![
        s().prop_map(LockTarget::User),
        s().prop_map(LockTarget::Device),
        s().prop_map(LockTarget::Gateway),
    ]
}
pub fn lock_spec() -> impl Strategy<Value = LockSpec> + Clone {
    (lock_target(), s(), any::<u64>()).prop_map(|(target, message, expires)| LockSpec {
        target,
        message,
        expires,
    })
}
pub fn role_spec() -> impl Strategy<Value = RoleSpec> + Clone {
    (
        s(),
        rules(),
        rules(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        vs(),
        vs(),
        any::<bool>(),
        vs(),
        rules(),
    )
        .prop_map(
            |(
                name,
                allow_labels,
                deny_labels,
                max_session_ttl,
                permit_pty,
                permit_port_forwarding,
                permit_agent_forwarding,
                request_roles,
                review_roles,
                require_session_mfa,
                join_sessions,
                require_moderator,
            )| {
                RoleSpec {
                    name,
                    allow_labels,
                    deny_labels,
                    max_session_ttl,
                    permit_pty,
                    permit_port_forwarding,
                    permit_agent_forwarding,
                    request_roles,
                    review_roles,
                    require_session_mfa,
                    join_sessions,
                    require_moderator,
                }
            },
        )
}
pub fn sso_kind() -> impl Strategy<Value = SsoConnectorKind> + Clone {
    prop_oneof![
        (s(), s(), s(), vs()).prop_map(|(issuer, username_claim, groups_claim, scopes)| {
            SsoConnectorKind::Oidc {
                issuer,
                username_claim,
                groups_claim,
                scopes,
            }
        }),
        (s(), s()).prop_map(|(url, api_url)| SsoConnectorKind::GitHub { url, api_url }),
    ]
}
pub fn sso_mapping() -> impl Strategy<Value = SsoMapping> + Clone {
    (s(), vs(), vs(), vs(), vs()).prop_map(|(group, roles, logins, kube_groups, kube_users)| {
        SsoMapping {
            group,
            roles,
            logins,
            kube_groups,
            kube_users,
        }
    })
}
pub fn token_info() -> impl Strategy<Value = TokenInfo> + Clone {
    (
        os(),
        s(),
        token_kind(),
        labels(),
        any::<u64>(),
        any::<bool>(),
        any::<u32>(),
        s(),
    )
        .prop_map(
            |(token, id, kind, labels, expires, reusable, uses, ca_pin)| TokenInfo {
                token,
                id,
                kind,
                labels,
                expires,
                reusable,
                uses,
                ca_pin,
            },
        )
}
pub fn device_presence() -> impl Strategy<Value = DevicePresence> + Clone {
    (
        s(),
        labels(),
        s(),
        s(),
        transport(),
        s(),
        any::<u32>(),
        any::<u64>(),
        os(),
        (of(any::<u32>()), of(usage_report()), of(tunnel_proof())),
    )
        .prop_map(
            |(
                id,
                labels,
                version,
                arch,
                transport,
                address,
                rtt_ms,
                connected_at,
                kube_cluster,
                (loss_permille, usage, proof),
            )| DevicePresence {
                id,
                labels,
                version,
                arch,
                transport,
                address,
                rtt_ms,
                connected_at,
                kube_cluster,
                loss_permille,
                usage,
                proof,
            },
        )
}

pub fn tunnel_proof() -> impl Strategy<Value = edgeport_proto::attest::TunnelProof> + Clone {
    (s(), any::<u64>(), bytes()).prop_map(|(gateway, signed_at_ms, signature)| {
        edgeport_proto::attest::TunnelProof {
            gateway,
            signed_at_ms,
            signature,
        }
    })
}

pub fn usage_report() -> impl Strategy<Value = edgeport_proto::usage::UsageReport> + Clone {
    (
        any::<u64>(),
        vec(
            (s(), any::<u64>(), any::<u64>()).prop_map(|(service, up, down)| {
                edgeport_proto::usage::ServiceBytes { service, up, down }
            }),
            0..3,
        ),
    )
        .prop_map(|(since, services)| edgeport_proto::usage::UsageReport { since, services })
}

pub fn device_usage() -> impl Strategy<Value = edgeport_proto::usage::DeviceUsage> + Clone {
    (s(), any::<u64>(), usage_report()).prop_map(|(device, from, r)| {
        edgeport_proto::usage::DeviceUsage {
            device,
            from,
            services: r.services,
        }
    })
}
pub fn pairs() -> impl Strategy<Value = Vec<(String, String)>> + Clone {
    vec((s(), s()), 0..3)
}
pub fn stored_event() -> impl Strategy<Value = StoredEvent> + Clone {
    (s(), s(), s(), any::<u64>(), audit_event()).prop_map(
        |(source, device, gateway, received_ms, event)| StoredEvent {
            source,
            device,
            gateway,
            received_ms,
            event,
        },
    )
}
pub fn chain_report() -> impl Strategy<Value = ChainReport> + Clone {
    let alert = (s(), any::<u64>(), s(), any::<u64>(), s()).prop_map(
        |(device, time_ms, kind, seq, detail)| IntegrityAlert {
            device,
            time_ms,
            kind,
            seq,
            detail,
        },
    );
    (
        s(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        vs(),
        vec(alert, 0..2),
    )
        .prop_map(
            |(device, events, first_seq, last_seq, problems, alerts)| ChainReport {
                device,
                events,
                first_seq,
                last_seq,
                problems,
                alerts,
            },
        )
}

pub fn request() -> impl Strategy<Value = Request> {
    let sign =
        (s(), s(), any::<u64>(), ovs()).prop_map(|(user, ssh_public_key, ttl_secs, logins)| {
            Request::SignUser(SignUserRequest {
                user,
                ssh_public_key,
                ttl_secs,
                logins,
            })
        });
    let user_add = (s(), vs(), vs(), vs(), vs(), os(), any::<bool>()).prop_map(
        |(name, logins, roles, kube_groups, kube_users, password, require_totp)| {
            Request::UserAdd(UserSpec {
                name,
                logins,
                roles,
                kube_groups,
                kube_users,
                password,
                require_totp,
            })
        },
    );
    let token_add = (token_kind(), labels(), any::<u64>(), any::<bool>()).prop_map(
        |(kind, labels, ttl_secs, reusable)| {
            Request::TokenAdd(TokenSpec {
                kind,
                labels,
                ttl_secs,
                reusable,
            })
        },
    );
    let join_gw = (s(), os(), bytes(), vs(), vs()).prop_map(
        |(token, gateway_id, public_key_spki_der, dns_names, ip_addrs)| {
            Request::JoinGateway(JoinGatewayRequest {
                token,
                gateway_id,
                public_key_spki_der,
                dns_names,
                ip_addrs,
            })
        },
    );
    let renew_gw = (bytes(), vs(), vs()).prop_map(|(public_key_spki_der, dns_names, ip_addrs)| {
        Request::RenewGateway(RenewGatewayRequest {
            public_key_spki_der,
            dns_names,
            ip_addrs,
        })
    });
    let presence = (
        any::<u64>(),
        vec(device_presence(), 0..2),
        pairs(),
        any::<u32>(),
        any::<bool>(),
        os(),
        s(),
    )
        .prop_map(
            |(lease_secs, online, disconnected, part, more, peer_addr, version)| {
                Request::Presence(PresenceReport {
                    lease_secs,
                    online,
                    disconnected,
                    part,
                    more,
                    peer_addr,
                    version,
                })
            },
        );
    let query = (any::<u64>(), os(), os(), os(), os(), any::<u64>()).prop_map(
        |(since_ms, kind, device, user, session_id, offset)| {
            Request::AuditSearch(AuditQuery {
                since_ms,
                kind,
                device,
                user,
                session_id,
                offset,
            })
        },
    );
    let sso_start =
        (s(), s(), s(), s()).prop_map(|(connector, redirect_uri, proof_hash, client_addr)| {
            Request::SsoStart(SsoStartRequest {
                connector,
                redirect_uri,
                proof_hash,
                client_addr,
            })
        });
    let sso_finish = (s(), s(), s(), s(), any::<u64>(), s()).prop_map(
        |(state, code, proof, ssh_public_key, ttl_secs, client_addr)| {
            Request::SsoFinish(SsoFinishRequest {
                state,
                code,
                proof,
                ssh_public_key,
                ttl_secs,
                client_addr,
            })
        },
    );
    let connector = (s(), s(), s(), os(), sso_kind(), vs()).prop_map(
        |(name, client_id, client_secret, ca_pem, kind, web_origins)| {
            Request::SsoConnectorAdd(SsoConnectorSpec {
                name,
                client_id,
                client_secret,
                ca_pem,
                kind,
                web_origins,
            })
        },
    );
    let user_update = (
        s(),
        ovs(),
        ovs(),
        ovs(),
        ovs(),
        of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(
            |(name, logins, roles, kube_groups, kube_users, require_totp, reset_totp)| {
                Request::UserUpdate(UserUpdate {
                    name,
                    logins,
                    roles,
                    kube_groups,
                    kube_users,
                    require_totp,
                    reset_totp,
                })
            },
        );
    prop_oneof![
        Just(Request::Ping),
        Just(Request::ExportCas),
        sign,
        user_add,
        Just(Request::UserList),
        s().prop_map(|name| Request::UserRemove { name }),
        token_add,
        Just(Request::TokenList),
        s().prop_map(|id| Request::TokenRemove { id }),
        Just(Request::DeviceList),
        s().prop_map(|id| Request::DeviceRemove { id }),
        join_gw,
        join_device_request().prop_map(Request::JoinDevice),
        (s(), s(), of(renew_proof())).prop_map(|(device_id, ssh_public_key, proof)| {
            Request::RenewDevice(RenewDeviceRequest {
                device_id,
                ssh_public_key,
                proof,
            })
        }),
        renew_gw,
        presence,
        login_request().prop_map(Request::Login),
        (bytes(), s(), service()).prop_map(|(user_cert_der, device, service)| {
            Request::AuthorizeDial {
                user_cert_der,
                device,
                service,
            }
        }),
        lock_spec().prop_map(Request::LockAdd),
        lock_target().prop_map(|target| Request::LockRemove { target }),
        Just(Request::LockList),
        role_spec().prop_map(Request::RoleUpsert),
        Just(Request::RoleList),
        s().prop_map(|name| Request::RoleRemove { name }),
        s().prop_map(|after| Request::DevicePage { after }),
        (s(), audit_batch())
            .prop_map(|(device_id, batch)| Request::AuditUpload { device_id, batch }),
        vec(audit_event(), 0..3).prop_map(Request::AuditRecord),
        query,
        os().prop_map(|device| Request::AuditVerify { device }),
        (os(), ob()).prop_map(|(user, user_cert_der)| Request::RecordingList {
            user,
            user_cert_der
        }),
        (s(), os(), any::<u64>(), ob()).prop_map(|(session_id, user, offset, user_cert_der)| {
            Request::RecordingGet {
                session_id,
                user,
                offset,
                user_cert_der,
            }
        }),
        (bytes(), s()).prop_map(|(user_cert_der, after)| Request::UserDevicePage {
            user_cert_der,
            after
        }),
        sso_mapping().prop_map(Request::SsoMapSet),
        Just(Request::SsoMapList),
        s().prop_map(|group| Request::SsoMapRemove { group }),
        any::<u64>().prop_map(|seen| Request::WatchPolicy { seen }),
        (any::<u32>(), s()).prop_map(|(part, digest)| Request::PresenceAckPart { part, digest }),
        Just(Request::GatewayList),
        s().prop_map(|id| Request::GatewayRemove { id }),
        sso_start,
        sso_finish,
        connector,
        Just(Request::SsoConnectorList),
        s().prop_map(|name| Request::SsoConnectorRemove { name }),
        user_update,
        (os(), of(bytes()), os(), any::<u32>()).prop_map(|(user, user_cert_der, cursor, limit)| {
            Request::RecordingPage {
                user,
                user_cert_der,
                cursor,
                limit,
            }
        }),
        (s(), s(), os(), bytes(), s()).prop_map(
            |(user, password, otp, browser_key, client_addr)| {
                Request::WebLogin(WebLoginRequest {
                    user,
                    password,
                    otp,
                    browser_key,
                    client_addr,
                })
            }
        ),
        web_proof().prop_map(Request::WebSessionCheck),
        web_proof().prop_map(Request::WebLogout),
        (web_proof(), s()).prop_map(|(proof, after)| Request::WebDevicePage { proof, after }),
        (any::<u32>(), os()).prop_map(|(days, device)| Request::DeviceUsage { days, device }),
        (bytes(), bytes(), bytes()).prop_map(|(user_cert_der, body, signature)| {
            Request::AccessRequestUser(SignedUserAction {
                user_cert_der,
                body,
                signature,
            })
        }),
        Just(Request::AccessRequestList),
        (bytes(), bytes(), bytes()).prop_map(|(user_cert_der, body, signature)| {
            Request::SessionMfaCert(SignedUserAction {
                user_cert_der,
                body,
                signature,
            })
        }),
        (s(), s(), any::<u64>()).prop_map(|(name, ssh_public_key, ttl_secs)| Request::SignHost {
            name,
            ssh_public_key,
            ttl_secs
        }),
        proptest::option::of(bytes())
            .prop_map(|user_cert_der| Request::TargetList { user_cert_der }),
        (s(), target_cert_request())
            .prop_map(|(device_id, req)| Request::TargetCert { device_id, req }),
        (s(), of(any::<u64>()))
            .prop_map(|(id, data_budget)| Request::DeviceSetBudget { id, data_budget }),
        (ca_kind(), rotate_action())
            .prop_map(|(kind, action)| Request::CaRotate(CaRotateRequest { kind, action })),
        (s(), any::<bool>(), s(), any::<u64>()).prop_map(|(id, approve, reason, ttl_secs)| {
            Request::AccessRequestReview(AccessReview {
                id,
                approve,
                reason,
                ttl_secs,
            })
        }),
        (s(), any::<u64>(), bytes()).prop_map(|(sha256, offset, data)| Request::UpdateUpload {
            sha256,
            offset,
            data
        }),
        (s(), vs(), labels(), any::<u64>()).prop_map(|(sha256, devices, labels, rollback_secs)| {
            Request::UpdateStart(edgeport_proto::update::UpdateSpec {
                sha256,
                devices,
                labels,
                rollback_secs,
            })
        }),
        s().prop_map(|id| Request::UpdateStatus { id }),
        Just(Request::UpdateOrders),
        (s(), any::<u64>()).prop_map(|(sha256, offset)| Request::UpdateFetch { sha256, offset }),
        (s(), s(), any::<bool>(), s()).prop_map(|(id, device, accepted, message)| {
            Request::UpdateReport {
                id,
                device,
                accepted,
                message,
            }
        }),
        (web_proof(), s()).prop_map(|(proof, ssh_public_key)| Request::WebSessionCert {
            proof,
            ssh_public_key
        }),
        (web_proof(), os(), any::<u32>()).prop_map(|(proof, cursor, limit)| {
            Request::WebRecordingPage {
                proof,
                cursor,
                limit,
            }
        }),
        (web_proof(), s(), any::<u64>()).prop_map(|(proof, session_id, offset)| {
            Request::WebRecordingGet {
                proof,
                session_id,
                offset,
            }
        }),
        (web_proof(), audit_query())
            .prop_map(|(proof, query)| Request::WebAuditSearch { proof, query }),
        Just(Request::WebSsoConnectors),
        (s(), s(), bytes(), s()).prop_map(|(connector, redirect_uri, browser_key, client_addr)| {
            Request::WebSsoStart(WebSsoStartRequest {
                connector,
                redirect_uri,
                browser_key,
                client_addr,
            })
        }),
        (s(), s(), s(), bytes(), s()).prop_map(|(state, code, signed, signature, client_addr)| {
            Request::WebSsoFinish(WebSsoFinishRequest {
                state,
                code,
                signed,
                signature,
                client_addr,
            })
        }),
        web_proof().prop_map(Request::WebTerminalNonce),
        Just(Request::UpdateList),
        Just(Request::AuthorityList),
        s().prop_map(|token_sha256| Request::WebSessionAlive { token_sha256 }),
    ]
}

pub fn audit_query() -> impl Strategy<Value = AuditQuery> + Clone {
    (any::<u64>(), os(), os(), os(), os(), any::<u64>()).prop_map(
        |(since_ms, kind, device, user, session_id, offset)| AuditQuery {
            since_ms,
            kind,
            device,
            user,
            session_id,
            offset,
        },
    )
}

pub fn update_info() -> impl Strategy<Value = edgeport_proto::update::UpdateInfo> + Clone {
    let dev =
        (s(), s(), s()).prop_map(
            |(device, state, detail)| edgeport_proto::update::DeviceUpdate {
                device,
                state,
                detail,
            },
        );
    (s(), s(), any::<u64>(), vec(dev, 0..2)).prop_map(|(id, sha256, size, devices)| {
        edgeport_proto::update::UpdateInfo {
            id,
            sha256,
            size,
            devices,
        }
    })
}

pub fn update_summary() -> impl Strategy<Value = edgeport_proto::update::UpdateSummary> + Clone {
    (
        update_info(),
        labels(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(info, labels, rollback_secs, issued_at, expires_at)| {
            edgeport_proto::update::UpdateSummary {
                info,
                labels,
                rollback_secs,
                issued_at,
                expires_at,
            }
        })
}

pub fn update_order() -> impl Strategy<Value = edgeport_proto::update::UpdateOrder> + Clone {
    (s(), s(), any::<u64>(), bytes(), bytes(), vs()).prop_map(
        |(id, sha256, size, manifest, signature, pending)| edgeport_proto::update::UpdateOrder {
            id,
            sha256,
            size,
            signed: edgeport_proto::update::SignedManifest {
                manifest,
                signature,
            },
            pending,
        },
    )
}

pub fn web_proof() -> impl Strategy<Value = WebProof> + Clone {
    (s(), s(), bytes()).prop_map(|(token, signed, signature)| WebProof {
        token,
        signed,
        signature,
    })
}

pub fn response() -> impl Strategy<Value = Response> {
    let user_info = (
        s(),
        vs(),
        vs(),
        vs(),
        vs(),
        any::<bool>(),
        any::<u64>(),
        any::<bool>(),
        s(),
    )
        .prop_map(
            |(
                name,
                logins,
                roles,
                kube_groups,
                kube_users,
                has_password,
                created,
                locked,
                second_factor,
            )| UserInfo {
                name,
                logins,
                roles,
                kube_groups,
                kube_users,
                has_password,
                created,
                locked,
                second_factor,
            },
        );
    let ack = (
        vs(),
        vec(lock_spec(), 0..2),
        vec((s(), any::<u64>()), 0..2),
        vs(),
        vec((s(), any::<u64>()), 0..2),
        any::<bool>(),
        s(),
    )
        .prop_map(
            |(revoked_devices, locks, superseded, revoked_gateways, over_budget, more, digest)| {
                Response::PresenceAck(PresenceAck {
                    revoked_devices,
                    locks,
                    superseded,
                    revoked_gateways,
                    over_budget,
                    more,
                    digest,
                })
            },
        );
    let grant = (device_info(), vs(), vs(), vs(), os(), of(ticket()), s()).prop_map(
        |(device, logins, kube_groups, kube_users, gateway_addr, ticket, user)| {
            Response::DialAllowed(DialGrant {
                device,
                logins,
                kube_groups,
                kube_users,
                gateway_addr,
                ticket,
                user,
            })
        },
    );
    let role_info =
        (role_spec(), any::<bool>(), vs()).prop_map(|(spec, builtin, users)| RoleInfo {
            spec,
            builtin,
            users,
        });
    let gw_info = (
        (s(), os(), vs(), vs(), s(), any::<u32>()),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (id, peer_addr, dns_names, ip_addrs, version, tunnels),
                (joined_at, renewed_at, last_report, revoked, locked),
            )| {
                GatewayInfo {
                    id,
                    peer_addr,
                    dns_names,
                    ip_addrs,
                    version,
                    tunnels,
                    joined_at,
                    renewed_at,
                    last_report,
                    revoked,
                    locked,
                }
            },
        );
    let conn_info = (s(), s(), any::<bool>(), sso_kind(), vs()).prop_map(
        |(name, client_id, custom_ca, kind, web_origins)| SsoConnectorInfo {
            name,
            client_id,
            custom_ca,
            kind,
            web_origins,
        },
    );
    prop_oneof![
        Just(Response::Ok),
        rpc_error().prop_map(Response::Error),
        (s(), s()).prop_map(|(cluster, version)| Response::Pong { cluster, version }),
        cas().prop_map(Response::Cas),
        user_certs().prop_map(Response::UserCerts),
        (os(), of(any::<u64>())).prop_map(|(invite, invite_expires)| Response::UserAdded {
            invite,
            invite_expires
        }),
        vec(user_info, 0..2).prop_map(Response::Users),
        token_info().prop_map(Response::Token),
        vec(token_info(), 0..2).prop_map(Response::Tokens),
        devices().prop_map(Response::Devices),
        gateway_certs().prop_map(Response::GatewayCerts),
        device_certs().prop_map(Response::DeviceCerts),
        ack,
        grant,
        vec(lock_spec(), 0..2).prop_map(Response::Locks),
        vec(role_info, 0..2).prop_map(Response::Roles),
        (devices(), any::<bool>())
            .prop_map(|(devices, more)| Response::DevicePage { devices, more }),
        audit_ack().prop_map(Response::AuditAck),
        (vec(stored_event(), 0..2), of(any::<u64>()))
            .prop_map(|(events, next)| Response::AuditPage(AuditPage { events, next })),
        vec(chain_report(), 0..2).prop_map(Response::AuditReport),
        vec(recording_info(), 0..2).prop_map(Response::Recordings),
        (bytes(), any::<u64>()).prop_map(|(data, total)| Response::RecordingData { data, total }),
        vec(sso_mapping(), 0..2).prop_map(Response::SsoMaps),
        (any::<u64>(), any::<bool>())
            .prop_map(|(epoch, exclusive)| Response::Policy { epoch, exclusive }),
        vec(gw_info, 0..2).prop_map(Response::Gateways),
        s().prop_map(|auth_url| Response::SsoRedirect { auth_url }),
        vec(conn_info, 0..2).prop_map(Response::SsoConnectors),
        (vec(recording_info(), 0..2), os())
            .prop_map(|(recordings, next)| Response::RecordingPage { recordings, next }),
        (os(), s(), s(), vs(), vs(), any::<u64>(), bytes()).prop_map(
            |(token, csrf, user, logins, roles, expires, browser_key)| {
                Response::WebSession(WebSessionInfo {
                    token,
                    csrf,
                    user,
                    logins,
                    roles,
                    expires,
                    browser_key,
                })
            }
        ),
        vec(device_usage(), 0..2).prop_map(Response::DeviceUsage),
        vec(access_request_info(), 0..2).prop_map(Response::AccessRequests),
        (s(), any::<u64>())
            .prop_map(|(cert, valid_before)| Response::HostCert { cert, valid_before }),
        vec(target_info(), 0..2).prop_map(Response::Targets),
        vec(ca_rotation(), 0..3).prop_map(Response::CaRotations),
        session_mfa_cert().prop_map(Response::SessionMfaCert),
        update_info().prop_map(Response::Update),
        vec(update_order(), 0..2).prop_map(Response::UpdateOrders),
        bytes().prop_map(Response::UpdateChunk),
        vec(live_session(), 0..2).prop_map(Response::LiveSessions),
        (s(), any::<u64>())
            .prop_map(|(cert, valid_before)| Response::TargetCert { cert, valid_before }),
        (s(), any::<u64>()).prop_map(|(nonce, expires)| Response::WebNonce { nonce, expires }),
        vec(update_summary(), 0..2).prop_map(Response::UpdateList),
        vec(authority_info(), 0..2).prop_map(Response::Authorities),
    ]
}

pub fn authority_info() -> impl Strategy<Value = AuthorityInfo> {
    (
        (s(), s(), s()),
        (any::<u64>(), any::<u64>(), any::<bool>()),
        (vs(), vs(), s()),
    )
        .prop_map(
            |((id, address, version), (started, last_seen, stale), (missing, behind, remedy))| {
                AuthorityInfo {
                    id,
                    address,
                    version,
                    started,
                    last_seen,
                    stale,
                    missing,
                    behind,
                    remedy,
                }
            },
        )
}

pub fn ca_kind() -> impl Strategy<Value = CaKind> + Clone {
    prop_oneof![Just(CaKind::User), Just(CaKind::Host), Just(CaKind::X509)]
}

pub fn rotate_action() -> impl Strategy<Value = RotateAction> + Clone {
    prop_oneof![
        Just(RotateAction::Status),
        any::<u64>().prop_map(|grace_secs| RotateAction::Start { grace_secs }),
        Just(RotateAction::Advance),
        Just(RotateAction::Complete),
        Just(RotateAction::Rollback),
    ]
}

pub fn ca_rotation() -> impl Strategy<Value = CaRotation> {
    (
        ca_kind(),
        s(),
        s(),
        vs(),
        any::<u64>(),
        of(any::<u64>()),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(kind, phase, signing, trusted, grace_secs, drop_at, (gc, gt, dr, dn))| CaRotation {
                kind,
                phase,
                signing,
                trusted,
                grace_secs,
                drop_at,
                gateways_current: gc,
                gateways_total: gt,
                devices_renewed: dr,
                devices_online: dn,
            },
        )
}

pub fn agent_control() -> impl Strategy<Value = AgentControl> {
    prop_oneof![
        hello().prop_map(AgentControl::Hello),
        s().prop_map(|ssh_public_key| AgentControl::Renew { ssh_public_key }),
        (any::<u64>(), of(any::<u32>()))
            .prop_map(|(seq, rtt_ms)| AgentControl::Ping { seq, rtt_ms }),
        audit_batch().prop_map(AgentControl::Audit),
        usage_report().prop_map(AgentControl::Usage),
        target_cert_request().prop_map(AgentControl::TargetCert),
        (s(), renew_proof()).prop_map(|(ssh_public_key, proof)| AgentControl::RenewProven {
            ssh_public_key,
            proof
        }),
        tunnel_proof().prop_map(AgentControl::Attest),
    ]
}

pub fn renew_proof() -> impl Strategy<Value = edgeport_proto::renew::RenewProof> {
    (any::<u64>(), s(), bytes()).prop_map(|(signed_at, bundle, signature)| {
        edgeport_proto::renew::RenewProof {
            signed_at,
            bundle,
            signature,
        }
    })
}

pub fn gateway_control() -> impl Strategy<Value = GatewayControl> {
    prop_oneof![
        (s(), transport()).prop_map(|(gateway_id, transport)| GatewayControl::Welcome {
            gateway_id,
            transport
        }),
        device_certs().prop_map(GatewayControl::Renewed),
        vs().prop_map(|users| GatewayControl::Locked { users }),
        rpc_error().prop_map(GatewayControl::Refused),
        any::<u64>().prop_map(|seq| GatewayControl::Pong { seq }),
        audit_ack().prop_map(GatewayControl::AuditAck),
        cas().prop_map(GatewayControl::Cas),
        os().prop_map(|exceeded| GatewayControl::Budget { exceeded }),
        (
            any::<u64>(),
            prop_oneof![s().prop_map(Ok), rpc_error().prop_map(Err)]
        )
            .prop_map(|(id, result)| GatewayControl::TargetCert { id, result }),
    ]
}

pub fn join_message() -> impl Strategy<Value = JoinMessage> {
    join_device_request().prop_map(JoinMessage::Join)
}

pub fn join_reply() -> impl Strategy<Value = JoinReply> {
    prop_oneof![
        device_certs().prop_map(JoinReply::Joined),
        rpc_error().prop_map(JoinReply::Refused)
    ]
}

pub fn client_request() -> impl Strategy<Value = ClientRequest> {
    prop_oneof![
        login_request().prop_map(ClientRequest::Login),
        Just(ClientRequest::ListDevices),
        (s(), service()).prop_map(|(target, service)| ClientRequest::Dial { target, service }),
        Just(ClientRequest::Recordings),
        s().prop_map(|session_id| ClientRequest::Recording { session_id }),
        (s(), s(), s()).prop_map(
            |(connector, redirect_uri, proof_hash)| ClientRequest::SsoStart {
                connector,
                redirect_uri,
                proof_hash
            }
        ),
        (s(), s(), s(), any::<u64>(), s()).prop_map(
            |(state, code, ssh_public_key, ttl_secs, proof)| {
                ClientRequest::SsoFinish(SsoFinish {
                    state,
                    code,
                    ssh_public_key,
                    ttl_secs,
                    proof,
                })
            }
        ),
        (s(), stream_header())
            .prop_map(|(device_id, header)| ClientRequest::Forward { device_id, header }),
        s().prop_map(|session_id| ClientRequest::SessionEnd { session_id }),
        (os(), any::<u32>())
            .prop_map(|(cursor, limit)| ClientRequest::RecordingPage { cursor, limit }),
        (s(), any::<u64>())
            .prop_map(|(session_id, offset)| ClientRequest::RecordingFrom { session_id, offset }),
        (bytes(), bytes())
            .prop_map(|(body, signature)| ClientRequest::UserAction { body, signature }),
        Just(ClientRequest::ListTargets),
        (bytes(), bytes())
            .prop_map(|(body, signature)| ClientRequest::SessionMfaCert { body, signature }),
    ]
}

pub fn access_request_info() -> impl Strategy<Value = AccessRequestInfo> + Clone {
    let state = prop_oneof![
        Just(AccessState::Pending),
        Just(AccessState::Approved),
        Just(AccessState::Denied),
        Just(AccessState::Expired),
    ];
    (
        (s(), s(), vs(), s(), state),
        (any::<u64>(), s(), s(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (id, user, roles, reason, state),
                (created, reviewer, review_reason, reviewed_at, expires),
            )| {
                AccessRequestInfo {
                    id,
                    user,
                    roles,
                    reason,
                    state,
                    created,
                    reviewer,
                    review_reason,
                    reviewed_at,
                    expires,
                }
            },
        )
}

pub fn client_reply() -> impl Strategy<Value = ClientReply> {
    prop_oneof![
        user_certs().prop_map(ClientReply::LoggedIn),
        devices().prop_map(ClientReply::Devices),
        (s(), s()).prop_map(|(session_id, device_id)| ClientReply::DialOk {
            session_id,
            device_id
        }),
        rpc_error().prop_map(ClientReply::Refused),
        devices().prop_map(ClientReply::DevicesPart),
        vec(recording_info(), 0..2).prop_map(ClientReply::Recordings),
        (bytes(), any::<bool>()).prop_map(|(data, more)| ClientReply::RecordingData { data, more }),
        s().prop_map(|auth_url| ClientReply::SsoRedirect { auth_url }),
        os().prop_map(|reason| ClientReply::SessionEnd { reason }),
        (vec(recording_info(), 0..2), os())
            .prop_map(|(recordings, next)| ClientReply::RecordingPage { recordings, next }),
        vec(access_request_info(), 0..2).prop_map(ClientReply::AccessRequests),
        vec(target_info(), 0..2).prop_map(ClientReply::Targets),
        session_mfa_cert().prop_map(ClientReply::SessionMfaCert),
        vec(live_session(), 0..2).prop_map(ClientReply::LiveSessions),
    ]
}
pub fn live_session() -> impl Strategy<Value = LiveSession> + Clone {
    (s(), s(), s(), s(), s(), any::<u64>(), vs()).prop_map(
        |(session_id, device, user, login, kind, started_ms, participants)| LiveSession {
            session_id,
            device,
            user,
            login,
            kind,
            started_ms,
            participants,
        },
    )
}

pub fn session_mfa_cert() -> impl Strategy<Value = SessionMfaCert> + Clone {
    (s(), s(), any::<u64>()).prop_map(|(device, ssh_cert, valid_before)| SessionMfaCert {
        device,
        ssh_cert,
        valid_before,
    })
}

pub fn target_info() -> impl Strategy<Value = edgeport_proto::targets::TargetInfo> + Clone {
    (
        (s(), s(), s(), labels(), of(any::<bool>()), any::<u64>()),
        (of(s()), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (device, name, addr, labels, reachable, checked_ms),
                (hostkey, hostkey_mismatch, record),
            )| {
                edgeport_proto::targets::TargetInfo {
                    device,
                    name,
                    addr,
                    labels,
                    reachable,
                    checked_ms,
                    hostkey,
                    hostkey_mismatch,
                    record,
                }
            },
        )
}

pub fn target_cert_request(
) -> impl Strategy<Value = edgeport_proto::targets::TargetCertRequest> + Clone {
    (
        any::<u64>(),
        (s(), s(), s(), s()),
        (s(), s(), any::<u64>(), bytes()),
    )
        .prop_map(
            |(
                id,
                (device_cert, target, login, session_id),
                (user_cert, public_key, signed_at, signature),
            )| {
                edgeport_proto::targets::TargetCertRequest {
                    id,
                    device_cert,
                    target,
                    login,
                    session_id,
                    user_cert,
                    public_key,
                    signed_at,
                    signature,
                }
            },
        )
}
