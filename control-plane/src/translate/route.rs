//! RDS: the `outbound` `RouteConfiguration` — one virtual host per Service port, its domains,
//! and the `ServiceRoute`s attached to it merged in Gateway API precedence order.
//!
//! Domains are unique across the configuration (Envoy NACKs duplicates): the Services' own
//! names are claimed first, then each route's `hostnames`, oldest route first; a route that
//! loses a hostname is `Accepted=False, HostnameConflict` and keeps the rest. A route whose
//! parent Service lives in another namespace is a GAMMA *consumer* route: it only applies to
//! proxies in the route's own namespace (statuses are computed the same for every proxy).
//!
//! What a single rule turns into is [`super::rule`]'s business.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch as EnvoyRouteMatch, VirtualHost, route,
    route_action, route_match,
};

use super::node::NodeInfo;
use super::policy::Policies;
use super::rule::{self, RuleInput};
use super::service::{Services, owns_short_name, service_domains, vhost_name};
use super::status::{ObjectKind, Statuses, reason};
use super::util::{Age, port_u16};
use crate::api::{PathMatchType, RouteMatch, ServiceRoute};
use crate::store::{ObjectKey, StoreSnapshot};

/// The name of the outbound route configuration (and of the listener that uses it).
pub(crate) const OUTBOUND: &str = super::listener::OUTBOUND;

/// Where a route sorts among the routes of a virtual host: Exact path, then PathPrefix
/// (longest first), then RegularExpression, then the catch-all PathPrefix `/`; then a method
/// match, more header matches, more query matches; then the older route, the rule index and
/// the match index. (Gateway API leaves regex precedence to implementations; ranking it after
/// specific prefixes but before `/` keeps a route's catch-all rule from shadowing its regex
/// rules.)
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Precedence {
    path_class: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    age: Age,
    rule: usize,
    matched: usize,
}

impl Precedence {
    pub(crate) fn of(m: &RouteMatch, age: &Age, rule: usize, matched: usize) -> Precedence {
        let (path_class, path_len) = match &m.path {
            None => (3, 1),
            Some(p) => match p.type_ {
                PathMatchType::Exact => (0, p.value.len()),
                PathMatchType::PathPrefix if p.value == "/" => (3, 1),
                PathMatchType::PathPrefix => (1, p.value.len()),
                PathMatchType::RegularExpression => (2, 0),
            },
        };
        Precedence {
            path_class,
            path_len: Reverse(path_len),
            no_method: m.method.is_none(),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query_params.len()),
            age: age.clone(),
            rule,
            matched,
        }
    }
}

/// Who holds a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    Service(ObjectKey),
    Route {
        route: ObjectKey,
        service: ObjectKey,
    },
}

#[derive(Default)]
struct Vhost {
    domains: Vec<String>,
    routes: Vec<(Precedence, Route)>,
    attached: bool,
}

/// One route's attachment to one parent Service.
struct Attachment {
    service: ObjectKey,
    ports: BTreeSet<u16>,
    /// Consumer routes only apply to proxies in the route's namespace.
    visible: bool,
}

/// Builds the outbound route configuration, recording route statuses.
pub(crate) fn outbound(
    snapshot: &StoreSnapshot,
    services: &Services,
    policies: &Policies<'_>,
    node: &NodeInfo,
    statuses: &mut Statuses,
) -> RouteConfiguration {
    let mut vhosts: BTreeMap<(ObjectKey, u16), Vhost> = BTreeMap::new();
    let mut claims: BTreeMap<String, Owner> = BTreeMap::new();

    // The Services' own names come first: they are what a Service *is*.
    for (key, svc) in &services.by_key {
        let short = owns_short_name(services, key, node.namespace.as_deref());
        let bare_port = svc.default_port();
        for port in &svc.ports {
            let vhost = vhosts.entry((key.clone(), port.port)).or_default();
            for domain in service_domains(svc, port.port, short, Some(port.port) == bare_port) {
                if !claims.contains_key(&domain) {
                    claims.insert(domain.clone(), Owner::Service(key.clone()));
                    vhost.domains.push(domain);
                }
            }
        }
    }

    let mut ordered: Vec<(Age, &ObjectKey, &ServiceRoute)> = snapshot
        .routes
        .iter()
        .map(|(key, r)| (Age::of(&r.metadata, key), key, r))
        .collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));

    for (age, key, route) in &ordered {
        statuses.register(ObjectKind::ServiceRoute, key, route.metadata.generation);
        let attachments = attach(key, route, services, node, statuses);
        claim_hostnames(
            key,
            route,
            &attachments,
            services,
            &mut claims,
            &mut vhosts,
            statuses,
        );
        for attachment in &attachments {
            let Some(parent) = services.get(&attachment.service) else {
                continue;
            };
            for port in &attachment.ports {
                let Some(parent_port) = parent.port(*port) else {
                    continue;
                };
                let input = RuleInput {
                    route_key: key,
                    services,
                    policies,
                    parent_port,
                };
                let mut built = Vec::new();
                for (r, rule) in route.spec.rules.iter().enumerate() {
                    for (m, route_match, envoy_route) in rule::build(&input, r, rule, statuses) {
                        built.push((Precedence::of(&route_match, age, r, m), envoy_route));
                    }
                }
                // Statuses are the same for every proxy; only visible attachments are served.
                if attachment.visible
                    && let Some(vhost) = vhosts.get_mut(&(attachment.service.clone(), *port))
                {
                    vhost.attached = true;
                    vhost.routes.extend(built);
                }
            }
        }
    }

    let mut virtual_hosts: Vec<VirtualHost> = vhosts
        .into_iter()
        .filter_map(|((svc, port), mut vhost)| {
            let cluster = services.get(&svc)?.port(port)?.cluster.clone();
            let hash_policy = rule::hash_policies(policies, [(&svc, port)].into_iter());
            vhost.routes.sort_by(|a, b| a.0.cmp(&b.0));
            let routes = if vhost.attached {
                vhost.routes.into_iter().map(|(_, r)| r).collect()
            } else {
                vec![default_route(cluster, hash_policy)]
            };
            Some(VirtualHost {
                name: vhost_name(&svc, port),
                domains: vhost.domains,
                routes,
                ..Default::default()
            })
        })
        .collect();
    virtual_hosts.sort_by(|a, b| a.name.cmp(&b.name));
    RouteConfiguration {
        name: OUTBOUND.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

/// `prefix: /` to the Service port's own cluster: a Service without routes.
fn default_route(cluster: String, hash_policy: Vec<route_action::HashPolicy>) -> Route {
    Route {
        name: "default".to_string(),
        r#match: Some(EnvoyRouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
            hash_policy,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Resolves a route's `parentRefs` to Service ports, reporting the ones that do not resolve.
fn attach(
    key: &ObjectKey,
    route: &ServiceRoute,
    services: &Services,
    node: &NodeInfo,
    statuses: &mut Statuses,
) -> Vec<Attachment> {
    let kind = ObjectKind::ServiceRoute;
    let mut by_service: BTreeMap<ObjectKey, BTreeSet<u16>> = BTreeMap::new();
    for (i, parent) in route.spec.parent_refs.iter().enumerate() {
        let group_ok = parent
            .group
            .as_deref()
            .is_none_or(|g| g.is_empty() || g == "core");
        if !group_ok || parent.kind.as_deref().is_some_and(|k| k != "Service") {
            statuses.not_accepted(
                kind,
                key,
                reason::INVALID_KIND,
                format!(
                    "spec.parentRefs[{i}]: {}/{} is not a Service (routes attach to core Services)",
                    parent.group.as_deref().unwrap_or(""),
                    parent.kind.as_deref().unwrap_or("Service")
                ),
            );
            continue;
        }
        let svc_key = ObjectKey::new(
            parent
                .namespace
                .clone()
                .unwrap_or_else(|| key.namespace.clone()),
            parent.name.clone(),
        );
        let Some(svc) = services.get(&svc_key) else {
            statuses.not_accepted(
                kind,
                key,
                reason::NO_MATCHING_PARENT,
                format!("spec.parentRefs[{i}]: Service {svc_key} not found"),
            );
            continue;
        };
        let ports: Vec<u16> = match parent.port {
            Some(p) => match port_u16(p).filter(|p| svc.port(*p).is_some()) {
                Some(p) => vec![p],
                None => {
                    statuses.not_accepted(
                        kind,
                        key,
                        reason::NO_MATCHING_PARENT,
                        format!("spec.parentRefs[{i}].port: Service {svc_key} has no TCP port {p}"),
                    );
                    continue;
                }
            },
            None => svc.ports.iter().map(|p| p.port).collect(),
        };
        if ports.is_empty() {
            statuses.not_accepted(
                kind,
                key,
                reason::NO_MATCHING_PARENT,
                format!("spec.parentRefs[{i}]: Service {svc_key} has no TCP ports"),
            );
            continue;
        }
        by_service.entry(svc_key).or_default().extend(ports);
    }
    by_service
        .into_iter()
        .map(|(service, ports)| Attachment {
            visible: service.namespace == key.namespace
                || node.namespace.as_deref() == Some(key.namespace.as_str()),
            service,
            ports,
        })
        .collect()
}

/// Adds a route's `hostnames` to the virtual hosts it attaches to: `host:port` on each port,
/// the bare `host` on one port per Service (the default port when attached, else the lowest).
fn claim_hostnames(
    key: &ObjectKey,
    route: &ServiceRoute,
    attachments: &[Attachment],
    services: &Services,
    claims: &mut BTreeMap<String, Owner>,
    vhosts: &mut BTreeMap<(ObjectKey, u16), Vhost>,
    statuses: &mut Statuses,
) {
    for attachment in attachments {
        let default_port = services
            .get(&attachment.service)
            .and_then(|s| s.default_port());
        let bare_port = default_port
            .filter(|p| attachment.ports.contains(p))
            .or_else(|| attachment.ports.first().copied());
        for (h, hostname) in route.spec.hostnames.iter().enumerate() {
            let host = hostname.0.to_ascii_lowercase();
            for port in &attachment.ports {
                let mut candidates = Vec::new();
                if Some(*port) == bare_port {
                    candidates.push(host.clone());
                }
                candidates.push(format!("{host}:{port}"));
                for domain in candidates {
                    match claims.get(&domain) {
                        None => {
                            claims.insert(
                                domain.clone(),
                                Owner::Route {
                                    route: key.clone(),
                                    service: attachment.service.clone(),
                                },
                            );
                            if attachment.visible
                                && let Some(vhost) =
                                    vhosts.get_mut(&(attachment.service.clone(), *port))
                            {
                                vhost.domains.push(domain);
                            }
                        }
                        Some(owner) => {
                            let held_by = match owner {
                                Owner::Service(svc) => format!("a name of Service {svc}"),
                                Owner::Route { route, service } if route == key => {
                                    format!("already routed by this route to Service {service}")
                                }
                                Owner::Route { route, .. } => {
                                    format!("claimed by the older ServiceRoute {route}")
                                }
                            };
                            statuses.not_accepted(
                                ObjectKind::ServiceRoute,
                                key,
                                reason::HOSTNAME_CONFLICT,
                                format!("spec.hostnames[{h}]: {host} is {held_by}; not served for Service {}", attachment.service),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HeaderMatch, HttpMethod, PathMatch, QueryParamMatch, StringMatchType};

    fn m(type_: PathMatchType, value: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch {
                type_,
                value: value.into(),
            }),
            ..Default::default()
        }
    }

    fn age(name: &str) -> Age {
        Age::of(&Default::default(), &ObjectKey::new("ns", name))
    }

    #[test]
    fn precedence_follows_gateway_api_order() {
        let a = age("a");
        let header = |m: &mut RouteMatch, n: usize| {
            m.headers = (0..n)
                .map(|i| HeaderMatch {
                    type_: StringMatchType::Exact,
                    name: format!("h{i}"),
                    value: "v".into(),
                })
                .collect()
        };
        let mut with_method = m(PathMatchType::PathPrefix, "/api");
        with_method.method = Some(HttpMethod::GET);
        let mut two_headers = m(PathMatchType::PathPrefix, "/api");
        header(&mut two_headers, 2);
        let mut one_header = m(PathMatchType::PathPrefix, "/api");
        header(&mut one_header, 1);
        let mut one_header_query = one_header.clone();
        one_header_query.query_params = vec![QueryParamMatch {
            type_: StringMatchType::Exact,
            name: "q".into(),
            value: "1".into(),
        }];
        let cases = [
            ("exact", m(PathMatchType::Exact, "/a")),
            ("long prefix", m(PathMatchType::PathPrefix, "/api/v1")),
            ("method", with_method),
            ("two headers", two_headers),
            ("header+query", one_header_query),
            ("one header", one_header),
            ("plain prefix", m(PathMatchType::PathPrefix, "/api")),
            ("regex", m(PathMatchType::RegularExpression, "/.*")),
            ("root", m(PathMatchType::PathPrefix, "/")),
            ("no path", RouteMatch::default()),
        ];
        let mut keyed: Vec<(Precedence, &str)> = cases
            .iter()
            .enumerate()
            .map(|(i, (name, mt))| (Precedence::of(mt, &a, 0, i), *name))
            .collect();
        keyed.reverse();
        keyed.sort();
        let order: Vec<&str> = keyed.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            order,
            vec![
                "exact",
                "long prefix",
                "method",
                "two headers",
                "header+query",
                "one header",
                "plain prefix",
                "regex",
                "root",
                "no path"
            ]
        );
    }

    #[test]
    fn ties_go_to_the_older_route_then_rule_then_match() {
        let prefix = m(PathMatchType::PathPrefix, "/x");
        let older = Precedence::of(&prefix, &age("a"), 5, 5);
        let newer = Precedence::of(&prefix, &age("b"), 0, 0);
        assert!(older < newer);
        assert!(
            Precedence::of(&prefix, &age("a"), 0, 3) < Precedence::of(&prefix, &age("a"), 1, 0)
        );
        assert!(
            Precedence::of(&prefix, &age("a"), 1, 0) < Precedence::of(&prefix, &age("a"), 1, 1)
        );
    }
}
