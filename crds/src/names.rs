//! Names and labels of the objects the operator creates in a tenant namespace. Shared by the
//! controllers, the API (which finds inference and outputs pods through them) and the tests.

/// Field manager of every server-side apply by the operator.
pub const FIELD_MANAGER: &str = "atelier-operator";

pub const INFERENCE: &str = "inference";
pub const OUTPUTS: &str = "outputs";
/// The output PersistentVolumeClaim.
pub const OUTPUTS_CLAIM: &str = "outputs";
/// ServiceAccount of the tenant's pods (no token mounted).
pub const WORKLOAD_SERVICE_ACCOUNT: &str = "atelier-workload";
/// Port of the inference job API and of the outputs server.
pub const HTTP_PORT: u16 = 8080;
pub const HTTP_PORT_NAME: &str = "http";

pub const LABEL_TENANT: &str = "atelier.dev/tenant";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";

/// Finalizer that lets the tenant controller cancel jobs and keep data before the namespace goes.
pub const TENANT_FINALIZER: &str = "atelier.dev/tenant-cleanup";
