//! LDS: the `outbound` listener (127.0.0.1:15001, HTTP routed by RDS `outbound`) and, for
//! proxies that declare application ports, the `inbound` listener (0.0.0.0:15006) that hands
//! each connection to the app port it was originally sent to.
//!
//! The inbound listener's route configurations are inline (they never change with CRDs), so
//! it warms without waiting for RDS.

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;

use super::cluster::{ads_config_source, inbound_name};
use super::util::{boolv, socket_address};

/// The outbound listener and its route configuration.
pub(crate) const OUTBOUND: &str = "outbound";
pub(crate) const OUTBOUND_ADDRESS: (&str, u16) = ("127.0.0.1", 15001);
/// The inbound listener.
pub(crate) const INBOUND: &str = "inbound";
pub(crate) const INBOUND_ADDRESS: (&str, u16) = ("0.0.0.0", 15006);

const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";

/// Every listener for a proxy with these application ports, sorted by name.
pub(crate) fn listeners(app_ports: &[u16]) -> Vec<Listener> {
    let mut out = vec![outbound()];
    if !app_ports.is_empty() {
        out.insert(0, inbound(app_ports));
    }
    out
}

fn outbound() -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: OUTBOUND.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: OUTBOUND.to_string(),
        })),
        http_filters: vec![router()],
        ..Default::default()
    };
    Listener {
        name: OUTBOUND.to_string(),
        address: Some(socket_address(OUTBOUND_ADDRESS.0, OUTBOUND_ADDRESS.1)),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(hcm)],
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

fn inbound(app_ports: &[u16]) -> Listener {
    let chain = |port: u16, matched: bool| FilterChain {
        name: if matched {
            format!("inbound|{port}")
        } else {
            "inbound|default".to_string()
        },
        filter_chain_match: matched.then(|| FilterChainMatch {
            destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: u32::from(port),
            }),
            ..Default::default()
        }),
        filters: vec![hcm_filter(inbound_hcm(port))],
        ..Default::default()
    };
    Listener {
        name: INBOUND.to_string(),
        address: Some(socket_address(INBOUND_ADDRESS.0, INBOUND_ADDRESS.1)),
        filter_chains: app_ports.iter().map(|p| chain(*p, true)).collect(),
        // Connections whose original port is no declared app port (or that reached 15006
        // directly) go to the first app port.
        default_filter_chain: app_ports.first().map(|p| chain(*p, false)),
        // Restores the original destination of iptables-redirected connections, which
        // `destination_port` matches on.
        use_original_dst: boolv(true),
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

fn inbound_hcm(port: u16) -> HttpConnectionManager {
    let name = format!("inbound|{port}");
    let route = Route {
        name: "default".to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(inbound_name(port))),
            // The calling side's route owns the request timeout; the app may take its time.
            timeout: Some(PbDuration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: format!("inbound_{port}"),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name,
                    domains: vec!["*".to_string()],
                    routes: vec![route],
                    ..Default::default()
                }],
                // The cluster arrives by CDS; never reject the listener over ordering.
                validate_clusters: boolv(false),
                ..Default::default()
            },
        )),
        http_filters: vec![router()],
        ..Default::default()
    }
}

fn hcm_filter(hcm: HttpConnectionManager) -> Filter {
    Filter {
        name: HCM.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

fn router() -> HttpFilter {
    HttpFilter {
        name: ROUTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}
