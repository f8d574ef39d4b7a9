fn main() {
    use kube::CustomResourceExt;
    let crds = [capstan_control_plane::api::ServiceRoute::crd(), capstan_control_plane::api::ServicePolicy::crd()];
    for c in crds {
        println!("---");
        print!("{}", serde_saphyr::to_string(&c).expect("crd"));
    }
}
