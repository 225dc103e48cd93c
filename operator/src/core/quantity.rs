//! Kubernetes quantities as exact numbers of base units (CPUs, bytes). kube_quantity checks the
//! syntax, but its sums across suffixes go through `f32` factors (`128Mi` plus plain bytes comes
//! out bytes high), so every sum the operator writes is done here, in one unit, in decimal.

use std::str::FromStr;

use kube_quantity::ParsedQuantity;
use rust_decimal::Decimal;

/// `text` in base units, exactly (`1.5Gi` is 1 610 612 736, `100m` is 0.1); `None` when it is
/// not a Kubernetes quantity or does not fit a 96-bit decimal.
pub fn base_units(text: &str) -> Option<Decimal> {
    // Display keeps the value's own decimal digits and the suffix it was written with.
    let canonical = ParsedQuantity::try_from(text).ok()?.to_string();
    let split = canonical
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(canonical.len());
    let (number, suffix) = canonical.split_at(split);
    let (base, exponent): (i64, u32) = match suffix {
        "" => (1, 0),
        "n" => {
            return Decimal::from_str(number)
                .ok()?
                .checked_mul(Decimal::new(1, 9));
        }
        "u" => {
            return Decimal::from_str(number)
                .ok()?
                .checked_mul(Decimal::new(1, 6));
        }
        "m" => {
            return Decimal::from_str(number)
                .ok()?
                .checked_mul(Decimal::new(1, 3));
        }
        "k" => (1000, 1),
        "M" => (1000, 2),
        "G" => (1000, 3),
        "T" => (1000, 4),
        "P" => (1000, 5),
        "E" => (1000, 6),
        "Ki" => (1024, 1),
        "Mi" => (1024, 2),
        "Gi" => (1024, 3),
        "Ti" => (1024, 4),
        "Pi" => (1024, 5),
        "Ei" => (1024, 6),
        _ => return None,
    };
    let factor = Decimal::from(base.checked_pow(exponent)?);
    Decimal::from_str(number).ok()?.checked_mul(factor)
}

/// `per_replica × replicas + extra` in base units, written as a plain decimal quantity;
/// `None` when either is not a quantity.
pub fn scaled(per_replica: &str, replicas: u32, extra: &str) -> Option<String> {
    let total = base_units(per_replica)?
        .checked_mul(Decimal::from(replicas))?
        .checked_add(base_units(extra)?)?;
    Some(total.normalize().to_string())
}

/// Whether two quantities are the same amount however they are written (`1000m` and `1`).
pub fn same_amount(a: &str, b: &str) -> bool {
    matches!((base_units(a), base_units(b)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_exact() {
        assert_eq!(base_units("1.5Gi"), Some(Decimal::from(1_610_612_736u64)));
        assert_eq!(base_units("128Mi"), Some(Decimal::from(134_217_728u64)));
        assert_eq!(base_units("100m"), Some(Decimal::new(1, 1)));
        assert_eq!(base_units("2k"), Some(Decimal::from(2000)));
        assert_eq!(base_units("lots"), None);
    }

    #[test]
    fn plain_bytes_and_binary_suffixes_add_to_the_byte() {
        assert_eq!(scaled("1048576", 3, "128Mi").as_deref(), Some("137363456"));
        assert_eq!(scaled("1.5", 3, "100m").as_deref(), Some("4.6"));
    }

    #[test]
    fn same_amount_ignores_the_writing() {
        assert!(same_amount("1000m", "1"));
        assert!(same_amount("3200Mi", "3355443200"));
        assert!(!same_amount("1Ki", "1k"));
        assert!(!same_amount("lots", "lots"));
    }
}
