//! The routing configuration the interop and differential tests share: Services whose
//! endpoints are in-process test backends, and a ServiceRoute exercising every router feature.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::backend;

/// A Service on port 80 whose one endpoint is a test backend at `addr`.
pub fn service(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: default }}
spec:
  ports: [{{ name: http, port: 80, targetPort: {port} }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels: {{ kubernetes.io/service-name: {name} }}
addressType: IPv4
ports: [{{ name: http, port: {port} }}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ ready: true }}
  zone: zone-a
"#,
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// Routes for `reviews`: every match kind, a 90/10 split, header modifiers, a redirect and a
/// rewrite, and a catch-all to `reviews` itself.
pub const ROUTES: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata: { name: reviews, namespace: default }
spec:
  parentRefs: [{ name: reviews }]
  rules:
  - matches: [{ path: { type: Exact, value: /exact } }]
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - matches: [{ path: { type: PathPrefix, value: /v2 } }]
    backendRefs: [{ name: reviews-v2, port: 80 }]
  - matches: [{ path: { type: RegularExpression, value: "^/re/[0-9]+$" } }]
    backendRefs: [{ name: reviews-v3, port: 80 }]
  - matches: [{ headers: [{ name: x-version, value: v3 }] }]
    backendRefs: [{ name: reviews-v3, port: 80 }]
  - matches: [{ queryParams: [{ name: version, value: v2 }] }]
    backendRefs: [{ name: reviews-v2, port: 80 }]
  - matches: [{ method: POST, path: { value: /any } }]
    backendRefs: [{ name: reviews-v3, port: 80 }]
  - matches: [{ path: { value: /split } }]
    backendRefs:
    - { name: reviews-v1, port: 80, weight: 90 }
    - { name: reviews-v2, port: 80, weight: 10 }
  - matches: [{ path: { value: /headers } }]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{ name: x-set, value: by-route }]
        add: [{ name: x-added, value: "yes" }]
        remove: [x-remove-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{ name: x-response, value: added }]
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - matches: [{ path: { value: /old } }]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: { type: ReplacePrefixMatch, replacePrefixMatch: /new }
        statusCode: 302
  - matches: [{ path: { value: /moved } }]
    filters:
    - type: RequestRedirect
      requestRedirect: { scheme: https, hostname: elsewhere.example, port: 8443 }
  - matches: [{ path: { value: /rewrite } }]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example
        path: { type: ReplacePrefixMatch, replacePrefixMatch: /rewritten }
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - matches: [{ path: { value: /full } }]
    filters:
    - type: URLRewrite
      urlRewrite:
        path: { type: ReplaceFullPath, replaceFullPath: /replaced }
    backendRefs: [{ name: reviews-v2, port: 80 }]
  - backendRefs: [{ name: reviews, port: 80 }]
"#;

/// A route sending all of `details` to `backend`.
pub fn details_route(backend: &str) -> String {
    format!(
        "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {{ name: details, namespace: default }}\nspec:\n  parentRefs: [{{ name: details }}]\n  rules:\n  - backendRefs: [{{ name: {backend}, port: 80 }}]\n"
    )
}

/// Writes a file by write-then-rename, so a directory watcher never sees half of it.
pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// Starts the test backends and writes the whole routing configuration into `config`.
pub async fn routing_fixture(config: &Path) -> BTreeMap<&'static str, SocketAddr> {
    let mut backends = BTreeMap::new();
    for name in [
        "reviews",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "details",
        "details-v2",
    ] {
        let addr = backend::start(name).await;
        backends.insert(name, addr);
        write(config, &format!("svc-{name}.yaml"), &service(name, addr));
    }
    write(config, "routes.yaml", ROUTES);
    write(config, "details-route.yaml", &details_route("details"));
    backends
}
