//! Which requests the proxy guards, and how: the per-route settings of a TOML file.

use std::path::Path;
use std::time::Duration;

use http::Method;
use idemgate::http::Profile;
use serde::Deserialize;

/// What is wrong with a route file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has a field that does not exist or a value of the wrong
    /// type.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A duration that `humantime` cannot read (`30s`, `500ms`, `24h`, `7days`).
    #[error("{field} = {value:?}: {source}")]
    Duration {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why.
        source: humantime::DurationError,
    },
    /// A method that is not an HTTP method.
    #[error("{0:?} is not an HTTP method")]
    Method(String),
    /// A path pattern that is malformed or conflicts with another route's.
    #[error("route {path:?}: {source}")]
    Pattern {
        /// The pattern.
        path: String,
        /// Why.
        source: matchit::InsertError,
    },
    /// A `[[route]]` without `path`, or `[defaults]` with one.
    #[error("{0}")]
    Invalid(String),
}

/// The settings of one route, or the defaults of all (`[defaults]`); every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    path: Option<String>,
    guard: Option<bool>,
    methods: Option<Vec<String>>,
    key_required: Option<bool>,
    lease: Option<String>,
    retention: Option<String>,
    max_body: Option<usize>,
    max_response: Option<usize>,
    profile: Option<ProfileName>,
    wait: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProfileName {
    Ietf,
    Stripe,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Spec,
    #[serde(default, rename = "route")]
    routes: Vec<Spec>,
}

/// One route: the requests whose path matches `pattern`, and how they are guarded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// The path pattern (`/payments`, `/orders/{id}`, `/{*rest}`).
    pub pattern: String,
    /// `false`: the route's requests stream through untouched.
    pub guard: bool,
    /// The guarded methods (default POST and PATCH); the others stream through.
    pub methods: Vec<Method>,
    /// A guarded request without a key is refused with 400 (default), or passes unguarded.
    pub key_required: bool,
    /// The lease of a running request (default 30 s), renewed while the upstream works.
    pub lease: Duration,
    /// How long a response is replayed (default 24 h).
    pub retention: Duration,
    /// The largest request body buffered for the fingerprint (default 1 MiB; larger: 413).
    pub max_body: usize,
    /// The largest response stored (default 1 MiB; a larger one streams through and a retry
    /// gets 410).
    pub max_response: usize,
    /// Which responses are stored (default the IETF draft's).
    pub profile: Profile,
    /// A retry of a running request waits this long for its response (`None`, the default:
    /// 409 at once).
    pub wait: Option<Duration>,
    /// How long the upstream has to start its response (default: the proxy's timeout).
    pub timeout: Option<Duration>,
}

impl Route {
    /// A guarded route with the defaults.
    pub fn new(pattern: impl Into<String>) -> Self {
        Route {
            pattern: pattern.into(),
            guard: true,
            methods: vec![Method::POST, Method::PATCH],
            key_required: true,
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(86_400),
            max_body: 1 << 20,
            max_response: 1 << 20,
            profile: Profile::Ietf,
            wait: None,
            timeout: None,
        }
    }

    fn apply(mut self, spec: &Spec) -> Result<Self, ConfigError> {
        let duration = |field: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| {
                    humantime::parse_duration(v).map_err(|source| ConfigError::Duration {
                        field,
                        value: v.to_owned(),
                        source,
                    })
                })
                .transpose()
        };
        if let Some(g) = spec.guard {
            self.guard = g;
        }
        if let Some(methods) = &spec.methods {
            self.methods = methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| ConfigError::Method(m.clone()))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(r) = spec.key_required {
            self.key_required = r;
        }
        if let Some(d) = duration("lease", &spec.lease)? {
            self.lease = d;
        }
        if let Some(d) = duration("retention", &spec.retention)? {
            self.retention = d;
        }
        if let Some(n) = spec.max_body {
            self.max_body = n;
        }
        if let Some(n) = spec.max_response {
            self.max_response = n;
        }
        if let Some(p) = spec.profile {
            self.profile = match p {
                ProfileName::Ietf => Profile::Ietf,
                ProfileName::Stripe => Profile::Stripe,
            };
        }
        if let Some(d) = duration("wait", &spec.wait)? {
            self.wait = Some(d);
        }
        if let Some(d) = duration("timeout", &spec.timeout)? {
            self.timeout = Some(d);
        }
        Ok(self)
    }
}

/// The proxy's routes, matched by path (first route of a pattern that guards the method wins).
///
/// A route file in TOML; every field but `path` is optional, `[defaults]` sets them for all
/// routes, and requests that match no guarded route stream through untouched:
///
/// ```toml
/// [defaults]
/// lease = "30s"
/// retention = "24h"
///
/// [[route]]
/// path = "/payments"
/// methods = ["POST"]
/// wait = "10s"            # a retry waits for the running request's response (default: 409)
///
/// [[route]]
/// path = "/orders/{id}"
/// methods = ["POST", "PATCH"]
/// profile = "stripe"      # 5xx responses stored too (default "ietf": a 5xx releases the key)
/// max_body = 65536
/// max_response = 1048576
/// key_required = false    # a request without a key passes unguarded (default: 400)
/// timeout = "5s"          # the upstream's time to start its response
///
/// [[route]]
/// path = "/uploads/{*rest}"
/// guard = false           # streamed through untouched
/// ```
///
/// Patterns follow `matchit`: `{name}` matches one segment, `{*name}` the rest of the path.
#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<Route>,
    router: matchit::Router<Vec<usize>>,
}

impl Routes {
    /// Every path guarded with the defaults: POST and PATCH need an `Idempotency-Key`.
    pub fn guard_all() -> Self {
        Self::from_routes(vec![Route::new("/{*path}"), Route::new("/")])
            .expect("two distinct, valid patterns")
    }

    /// The routes of a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The routes of a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text)?;
        if file.defaults.path.is_some() || file.defaults.guard.is_some() {
            return Err(ConfigError::Invalid(
                "[defaults] takes route settings, not `path` or `guard`".into(),
            ));
        }
        let base = Route::new("").apply(&file.defaults)?;
        let routes = file
            .routes
            .iter()
            .map(|spec| {
                let path = spec
                    .path
                    .clone()
                    .ok_or_else(|| ConfigError::Invalid("a [[route]] without `path`".into()))?;
                Route {
                    pattern: path,
                    ..base.clone()
                }
                .apply(spec)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_routes(routes)
    }

    /// These routes, in order.
    pub fn from_routes(routes: Vec<Route>) -> Result<Self, ConfigError> {
        let mut by_pattern: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match by_pattern.iter_mut().find(|(p, _)| *p == r.pattern) {
                Some((_, list)) => list.push(i),
                None => by_pattern.push((r.pattern.clone(), vec![i])),
            }
        }
        let mut router = matchit::Router::new();
        for (pattern, list) in by_pattern {
            router
                .insert(pattern.clone(), list)
                .map_err(|source| ConfigError::Pattern {
                    path: pattern,
                    source,
                })?;
        }
        Ok(Routes { routes, router })
    }

    /// Every route, in order (its index is its place here).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The index of the route that guards `method` on `path`, if any.
    pub fn guarding(&self, method: &Method, path: &str) -> Option<usize> {
        let found = self.router.at(path).ok()?;
        found
            .value
            .iter()
            .copied()
            .find(|&i| self.routes[i].guard && self.routes[i].methods.contains(method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_routes_over_the_defaults() {
        let routes = Routes::from_toml(
            r#"
            [defaults]
            lease = "5s"
            [[route]]
            path = "/payments"
            methods = ["post"]
            wait = "2s"
            [[route]]
            path = "/orders/{id}"
            profile = "stripe"
            retention = "7days"
            [[route]]
            path = "/files/{*rest}"
            guard = false
            "#,
        )
        .unwrap();
        let r = routes.routes();
        assert_eq!(r[0].lease, Duration::from_secs(5));
        assert_eq!(r[0].methods, [Method::POST]);
        assert_eq!(r[0].wait, Some(Duration::from_secs(2)));
        assert_eq!(r[1].profile, Profile::Stripe);
        assert_eq!(r[1].retention, Duration::from_secs(7 * 86_400));
        assert_eq!(routes.guarding(&Method::POST, "/payments"), Some(0));
        assert_eq!(routes.guarding(&Method::PATCH, "/payments"), None);
        assert_eq!(routes.guarding(&Method::PATCH, "/orders/7"), Some(1));
        assert_eq!(routes.guarding(&Method::POST, "/files/a/b"), None);
        assert_eq!(routes.guarding(&Method::POST, "/elsewhere"), None);
    }

    #[test]
    fn guard_all_guards_every_path() {
        let routes = Routes::guard_all();
        assert!(routes.guarding(&Method::POST, "/").is_some());
        assert!(routes.guarding(&Method::POST, "/a/b/c").is_some());
        assert!(routes.guarding(&Method::GET, "/a").is_none());
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let err = |t: &str| Routes::from_toml(t).unwrap_err();
        assert!(matches!(
            err("[[route]]\npath = \"/a\"\nlease = \"soon\""),
            ConfigError::Duration { field: "lease", .. }
        ));
        assert!(matches!(
            err("[[route]]\npath = \"/a\"\nmethods = [\"PO ST\"]"),
            ConfigError::Method(_)
        ));
        assert!(matches!(
            err("[[route]]\npath = \"/a\"\nleese = \"5s\""),
            ConfigError::Toml(_)
        ));
        assert!(matches!(
            err("[[route]]\nlease = \"5s\""),
            ConfigError::Invalid(_)
        ));
        assert!(matches!(
            err("[[route]]\npath = \"/a/{x}\"\n[[route]]\npath = \"/a/{y}\""),
            ConfigError::Pattern { .. }
        ));
    }
}
