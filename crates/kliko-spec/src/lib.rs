//! `kliko-spec` owns what a kliko image declares and what it is given: parsing and
//! validating `/kliko.yml` ([`Spec`]), turning command-line flags and parameter files
//! into typed values ([`Spec::resolve`] → [`Params`]), and the two byte-exact outputs
//! made from them: the `/parameters.json` the container reads
//! ([`Params::container_json`]) and the parameters' part of a cache key
//! ([`Params::canonical_key_json`]). No Docker, no async, no I/O beyond reading the
//! files a caller names.
//!
//! ```
//! use kliko_spec::{ParamLayer, Spec};
//!
//! let spec = Spec::parse("kliko.yml", "
//! schema_version: 4
//! io: split
//! sections:
//!   - name: main
//!     description: settings
//!     fields:
//!       - name: threshold
//!         type: float
//!         initial: 0.5
//!       - name: mode
//!         type: choice
//!         choices: {fast: Fast, exact: Exact}
//! ")?;
//! let params = spec.resolve(&[ParamLayer::strings([("mode", "exact")])])?;
//! assert_eq!(
//!     String::from_utf8(params.container_json())?,
//!     "{\n  \"threshold\": 0.5,\n  \"mode\": \"exact\"\n}\n",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Decisions the contract leaves open
//!
//! - **Schema version.** A document without `schema_version` was written for kliko
//!   0.8, whose schema was version 3: it is read as version 3
//!   ([`DEFAULT_SCHEMA_VERSION`]) and [`Spec::schema_version_declared`] is `false`.
//!   The document's own version decides which field types it may use.
//! - **`required` defaults to `true`**, as in the Django forms the original runner
//!   built from kliko.yml. A required field without `initial` must be given a value;
//!   `required: false` makes a field optional, and an optional field left unset is
//!   `null` in `parameters.json`. An explicit `null` in a parameters file unsets a
//!   field even when it has an `initial` (like clearing a pre-filled form field).
//! - **YAML null means absent.** A kliko.yml key whose value is `~`, `null` or empty
//!   is treated as if it were not there.
//! - **Scalars are read by the declared type**, not by YAML's resolution rules: an
//!   `initial: 1e-6` of a `float` field is a float (PyYAML would have made it a
//!   string), `required: yes` is true. Bools accept `true`/`false`, `yes`/`no`,
//!   `on`/`off`, `1`/`0` in any case; ints reject `3.5`; floats accept ints and
//!   reject NaN and infinities.
//! - **File layout.** A `file` field's host file is copied to
//!   `/param_files/<field>` and its JSON value is that string. Item `i` (0-based) of
//!   a `List[file]` field is copied to `/param_files/<field>/<i>/<basename>`, which
//!   keeps both the order and the original file names, and never collides. A `file`
//!   field may not have an `initial`. [`Params::file_placements`] lists the copies.
//!   Field names may not contain `/` nor be `.` or `..`, since they name paths.
//! - **Lists on the command line**: a list flag may be repeated and each value may
//!   be comma-separated (`--sizes 1,2 --sizes 3` is `[1, 2, 3]`); an empty value is
//!   the empty list. A scalar flag given twice is an error.
//! - **Canonical float format** (in [`Params::canonical_key_json`]): the shortest
//!   decimal digits that read back as the same `f64`, in the scientific form of
//!   Rust's `{:e}`: `0.5` → `5e-1`, `3.0` → `3e0`, `1500.25` → `1.50025e3`. See
//!   [`canonical_float`]. Changing anything in that format bumps
//!   [`CANONICAL_PARAMS_FORMAT`].
//! - **Limits.** A kliko.yml (and a parameters file, and a pipeline file, which use the
//!   same [`yaml`] tree) is refused when it is longer than 512 KiB ([`yaml::MAX_BYTES`]),
//!   nests lists and mappings more than 64 levels deep ([`yaml::MAX_DEPTH`]), or would
//!   have more than 250,000 values or 8 MiB of text once its aliases are expanded
//!   ([`yaml::MAX_NODES`], [`yaml::MAX_TEXT`]): one problem, with the line where the
//!   limit was crossed. Real documents are a few KB and a few levels deep; the limits
//!   keep a "billion laughs" alias bomb or 5,000 nested lists from exhausting memory or
//!   the stack.

mod help;
mod params;
mod spec;
mod suggest;
pub mod yaml;

pub use help::field_flags_help;
pub use params::{
    canonical_float, ParamError, ParamErrors, ParamLayer, Params, Value, CANONICAL_PARAMS_FORMAT, PARAM_FILES_DIR,
};
pub use spec::{
    validate_file, Field, FieldType, IoMode, Problem, Section, Spec, SpecError, UnknownFieldType,
    DEFAULT_SCHEMA_VERSION, SCHEMA_VERSIONS,
};
