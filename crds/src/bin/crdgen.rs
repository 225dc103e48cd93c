//! Prints the CRDs of Atelier as YAML, or writes one file per CRD with `--out-dir`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let out_dir = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--out-dir"), Some(dir)) => Some(PathBuf::from(dir)),
        _ => {
            eprintln!("usage: crdgen [--out-dir DIR]");
            std::process::exit(2);
        }
    };
    for crd in atelier_crds::all_crds() {
        let yaml = atelier_crds::crd_yaml(&crd);
        match &out_dir {
            Some(dir) => std::fs::write(dir.join(atelier_crds::crd_file_name(&crd)), yaml)?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
