use super::*;
use std::collections::BTreeMap;

const DEPLOYMENT_POD: &str = include_str!("testdata/deployment-pod.json");
const ANNOTATED_POD: &str = include_str!("testdata/annotated-pod.json");
const OPTED_OUT_POD: &str = include_str!("testdata/opted-out-pod.json");
const DEPLOYMENT_UPDATE: &str = include_str!("testdata/deployment-update.json");

fn config() -> InjectConfig {
    let c: InjectConfig = serde_norway::from_str(
        "proxy_image: registry.example/custody-proxy:0.1.0\n\
         init_image: registry.example/custody-init:0.1.0\n\
         trust_domain: cluster.local\n\
         control_plane_url: http://custody-control.custody.svc:7070\n",
    )
    .unwrap();
    c.validate().unwrap();
    c
}

/// Applies RFC 6902 `add` operations, failing on anything a real API server
/// would refuse (missing parent, index out of range, other ops).
fn apply(doc: &mut Value, ops: &[Value]) {
    for op in ops {
        assert_eq!(op["op"], "add", "only add operations are expected: {op}");
        let path = op["path"].as_str().unwrap();
        let mut segments: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = segments.pop().unwrap();
        let mut target = &mut *doc;
        for s in &segments {
            target = match target {
                Value::Object(m) => m.get_mut(s).unwrap_or_else(|| panic!("no {s} in {path}")),
                Value::Array(a) => a.get_mut(s.parse::<usize>().unwrap()).unwrap(),
                _ => panic!("{path}: not a container"),
            };
        }
        let value = op["value"].clone();
        match target {
            Value::Object(m) => {
                m.insert(last, value);
            }
            Value::Array(a) if last == "-" => a.push(value),
            Value::Array(a) => {
                let i: usize = last.parse().unwrap();
                assert!(i <= a.len(), "{path}: index out of range");
                a.insert(i, value);
            }
            _ => panic!("{path}: not a container"),
        }
    }
}

/// Reviews `sample`; returns the response and the pod with the patch applied.
fn run(c: &InjectConfig, sample: &str) -> (Reviewed, Value) {
    let reviewed = review(c, sample.as_bytes()).unwrap();
    let mut pod: Value =
        serde_json::from_str::<Value>(sample).unwrap()["request"]["object"].clone();
    let response = &reviewed.response["response"];
    assert_eq!(reviewed.response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(reviewed.response["kind"], "AdmissionReview");
    assert_eq!(response["allowed"], true);
    let sent: Value = serde_json::from_str(sample).unwrap();
    assert_eq!(response["uid"], sent["request"]["uid"]);
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        apply(&mut pod, &ops);
    } else {
        assert!(response.get("patchType").is_none());
    }
    (reviewed, pod)
}

fn names(pod: &Value, key: &str) -> Vec<String> {
    pod["spec"][key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(pod: &'a Value, key: &str, name: &str) -> &'a Value {
    pod["spec"][key]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

#[test]
fn a_deployment_pod_gets_init_container_and_native_sidecar() {
    let (reviewed, pod) = run(&config(), DEPLOYMENT_POD);
    assert_eq!(reviewed.skipped, None);
    assert_eq!(
        names(&pod, "initContainers"),
        ["custody-init", "custody-proxy"]
    );
    assert_eq!(names(&pod, "containers"), ["web"]);
    assert_eq!(
        names(&pod, "volumes"),
        [
            "kube-api-access-9xk2p",
            "custody-config",
            "custody-token",
            "custody-state"
        ]
    );

    let proxy = container(&pod, "initContainers", "custody-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "registry.example/custody-proxy:0.1.0");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
    assert!(proxy["resources"]["requests"]["memory"].is_string());
    // The identity comes from the pod's metadata, through the downward API.
    let env: BTreeMap<&str, &str> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(env["CUSTODY_WORKLOAD_NAMESPACE"], "metadata.namespace");
    assert_eq!(
        env["CUSTODY_WORKLOAD_SERVICE_ACCOUNT"],
        "spec.serviceAccountName"
    );
    assert_eq!(env["CUSTODY_WORKLOAD_POD"], "metadata.name");

    let init = container(&pod, "initContainers", "custody-init");
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let script = init["command"][2].as_str().unwrap();
    assert!(script.contains("--uid-owner 1337 -j RETURN"), "{script}");
    // Inbound capture only for the port the sidecar forwards to.
    assert!(
        script.contains("-A CUSTODY_IN -p tcp --dport 8081 -j REDIRECT --to-ports 15006"),
        "{script}"
    );

    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["custody.io/status"], "injected");
    assert_eq!(pod["metadata"]["labels"]["custody.io/injected"], "true");
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // The rendered configuration names the pod's namespace and service
    // account, and sends inbound traffic to the first TCP port (not UDP).
    let proxy_config: Value =
        serde_norway::from_str(annotations["custody.io/proxy-config"].as_str().unwrap()).unwrap();
    assert_eq!(proxy_config["workload"]["namespace"], "shop");
    assert_eq!(proxy_config["workload"]["service_account"], "web");
    assert_eq!(proxy_config["workload"]["trust_domain"], "cluster.local");
    assert_eq!(proxy_config["inbound"]["upstream"], "127.0.0.1:8081");
    assert_eq!(proxy_config["outbound"]["mode"], "transparent");
    assert_eq!(
        proxy_config["policy"]["control_plane"],
        "http://custody-control.custody.svc:7070"
    );
    // The volume the sidecar reads its configuration from is that annotation.
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "custody-config")
        .unwrap();
    assert_eq!(
        volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.annotations['custody.io/proxy-config']"
    );
}

#[test]
fn an_injected_pod_is_not_injected_twice() {
    let c = config();
    let (_, once) = run(&c, DEPLOYMENT_POD);
    let mut again: Value = serde_json::from_str(DEPLOYMENT_POD).unwrap();
    again["request"]["object"] = once.clone();
    let (reviewed, twice) = run(&c, &again.to_string());
    assert_eq!(reviewed.skipped, Some(Skip::AlreadyInjected));
    assert_eq!(twice, once);

    // A sidecar container alone (status annotation removed) is enough.
    again["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(STATUS_ANNOTATION);
    let (reviewed, _) = run(&c, &again.to_string());
    assert_eq!(reviewed.skipped, Some(Skip::AlreadyInjected));
}

#[test]
fn the_opt_out_annotation_is_honoured() {
    let (reviewed, pod) = run(&config(), OPTED_OUT_POD);
    assert_eq!(reviewed.skipped, Some(Skip::OptedOut));
    assert_eq!(names(&pod, "initContainers"), Vec::<String>::new());
    assert!(reviewed.response["response"].get("patch").is_none());
    // Any other value does not opt out.
    let sample = OPTED_OUT_POD.replace(
        r#""custody.io/inject": "false""#,
        r#""custody.io/inject": "true""#,
    );
    let (reviewed, pod) = run(&config(), &sample);
    assert_eq!(reviewed.skipped, None);
    assert_eq!(
        names(&pod, "initContainers"),
        ["custody-init", "custody-proxy"]
    );
    // A pod without labels gets the label map.
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"custody.io/injected": "true"})
    );
}

#[test]
fn existing_annotations_init_containers_and_scrape_settings_are_kept() {
    let (reviewed, pod) = run(&config(), ANNOTATED_POD);
    assert_eq!(reviewed.skipped, None);
    // Native sidecar: the pod's own init container runs behind the sidecar.
    assert_eq!(
        names(&pod, "initContainers"),
        ["custody-init", "custody-proxy", "migrate"]
    );
    let a = &pod["metadata"]["annotations"];
    assert_eq!(
        a["prometheus.io/port"], "9100",
        "the app's scrape port is kept"
    );
    assert!(a.get("prometheus.io/path").is_none());
    assert_eq!(a["kubectl.kubernetes.io/last-applied-configuration"], "{}");
    assert_eq!(a["custody.io/status"], "injected");
    assert_eq!(pod["metadata"]["labels"]["custody.io/injected"], "true");
    assert_eq!(pod["metadata"]["labels"]["app"], "ledger");
    let proxy_config: Value =
        serde_norway::from_str(a["custody.io/proxy-config"].as_str().unwrap()).unwrap();
    assert_eq!(proxy_config["inbound"]["upstream"], "127.0.0.1:7000");
    assert_eq!(proxy_config["workload"]["namespace"], "billing");
    assert_eq!(proxy_config["workload"]["service_account"], "default");
    assert_eq!(
        names(&pod, "volumes"),
        ["custody-config", "custody-token", "custody-state"]
    );
}

#[test]
fn classic_sidecar_mode_puts_the_proxy_first_and_the_redirect_last() {
    let mut c = config();
    c.native_sidecar = false;
    let (_, pod) = run(&c, ANNOTATED_POD);
    assert_eq!(names(&pod, "initContainers"), ["migrate", "custody-init"]);
    assert_eq!(names(&pod, "containers"), ["custody-proxy", "ledger"]);
    let proxy = container(&pod, "containers", "custody-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    assert!(proxy.get("startupProbe").is_none());
    let (_, pod) = run(&c, DEPLOYMENT_POD);
    assert_eq!(names(&pod, "initContainers"), ["custody-init"]);
    assert_eq!(names(&pod, "containers"), ["custody-proxy", "web"]);
}

#[test]
fn other_objects_and_operations_pass_unchanged() {
    let (reviewed, _) = run(&config(), DEPLOYMENT_UPDATE);
    assert_eq!(reviewed.skipped, Some(Skip::NotAPodCreate));
    let update = DEPLOYMENT_POD.replace(r#""operation": "CREATE""#, r#""operation": "UPDATE""#);
    let (reviewed, _) = run(&config(), &update);
    assert_eq!(reviewed.skipped, Some(Skip::NotAPodCreate));
}

#[test]
fn an_application_on_a_sidecar_port_is_left_alone() {
    let sample = DEPLOYMENT_POD.replace(r#""containerPort": 8081"#, r#""containerPort": 15020"#);
    let (reviewed, _) = run(&config(), &sample);
    assert_eq!(reviewed.skipped, Some(Skip::PortConflict));
}

#[test]
fn host_network_pods_are_left_alone() {
    let sample =
        DEPLOYMENT_POD.replace(r#""dnsPolicy": "ClusterFirst","#, r#""hostNetwork": true,"#);
    let (reviewed, _) = run(&config(), &sample);
    assert_eq!(reviewed.skipped, Some(Skip::HostNetwork));
}

#[test]
fn malformed_reviews_are_refused() {
    let check = |body: &str| {
        assert!(
            matches!(
                review(&config(), body.as_bytes()),
                Err(InjectError::Malformed(_))
            ),
            "{body}"
        );
    };
    check("");
    check("[]");
    check(r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#);
    check(&DEPLOYMENT_POD.replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1"));
}

#[test]
fn the_redirect_matches_the_mesh_init_container() {
    let mut c = config();
    c.exclude_outbound_cidrs = vec!["10.96.0.1/32".into()];
    assert_eq!(
        redirect_script(&c, 8081),
        "set -eu\n\
         iptables -t nat -N CUSTODY_OUT\n\
         iptables -t nat -A OUTPUT -p tcp -j CUSTODY_OUT\n\
         iptables -t nat -A CUSTODY_OUT -m owner --uid-owner 1337 -j RETURN\n\
         iptables -t nat -A CUSTODY_OUT -d 127.0.0.0/8 -j RETURN\n\
         iptables -t nat -A CUSTODY_OUT -d 10.96.0.1/32 -j RETURN\n\
         iptables -t nat -A CUSTODY_OUT -p tcp -j REDIRECT --to-ports 15001\n\
         iptables -t nat -N CUSTODY_IN\n\
         iptables -t nat -A PREROUTING -p tcp -j CUSTODY_IN\n\
         iptables -t nat -A CUSTODY_IN -p tcp --dport 8081 -j REDIRECT --to-ports 15006\n"
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let check = |edit: &dyn Fn(&mut InjectConfig), want: &str| {
        let mut c = config();
        edit(&mut c);
        assert_eq!(c.validate().unwrap_err().0, want);
    };
    check(&|c| c.proxy_image.clear(), "inject.proxy_image");
    check(&|c| c.proxy_uid = 0, "inject.proxy_uid");
    check(
        &|c| c.control_plane_url = "custody:7070".into(),
        "inject.control_plane_url",
    );
    check(&|c| c.admin_port = c.inbound_port, "inject.inbound_port");
    check(
        &|c| c.exclude_outbound_cidrs = vec!["10.0.0.0/8; reboot".into()],
        "inject.exclude_outbound_cidrs[0]",
    );
    check(&|c| c.resources = json!("lots"), "inject.resources");
}

#[test]
fn with_workload_auth_the_sidecar_presents_a_projected_service_account_token() {
    let mut c = config();
    c.service_account_token = Some(
        serde_norway::from_str("{}").unwrap(), // the defaults: audience custody, 3600 s
    );
    c.validate().unwrap();
    let (reviewed, pod) = run(&c, DEPLOYMENT_POD);
    assert_eq!(reviewed.skipped, None);
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "custody-token")
        .unwrap();
    assert!(
        token.get("secret").is_none(),
        "no node-token Secret: {token}"
    );
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "custody", "expirationSeconds": 3600, "path": "token"})
    );
    let proxy = container(&pod, "initContainers", "custody-proxy");
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "custody-token")
        .unwrap();
    assert_eq!(mount["mountPath"], SERVICE_ACCOUNT_TOKEN_DIR);
    assert_eq!(mount["readOnly"], true);
    let annotations = &pod["metadata"]["annotations"];
    let proxy_config: Value =
        serde_norway::from_str(annotations[CONFIG_ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(
        proxy_config["control_plane"],
        json!({"service_account_token_file": "/var/run/secrets/custody/token"})
    );

    // The API server refuses tokens shorter than 10 minutes.
    c.service_account_token = Some(serde_norway::from_str("expiration_seconds: 300").unwrap());
    assert_eq!(
        c.validate().unwrap_err().0,
        "inject.service_account_token.expiration_seconds"
    );
}
