//! Writing to the server log.
//!
//! `RedisModule_Log` takes a printf format, and the crate passes the message as that format: a
//! `%` from a key name would be read as a conversion (undefined behaviour), and a NUL would make
//! the crate panic. Every kamsync log line goes through [`format_safe`] first.

use redis_module::Context;

/// The message with `%` doubled and control characters escaped.
pub fn format_safe(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        match c {
            '%' => out.push_str("%%"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

pub fn warning(ctx: &Context, message: &str) {
    ctx.log_warning(&format_safe(message));
}

pub fn notice(ctx: &Context, message: &str) {
    ctx.log_notice(&format_safe(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_signs_and_control_characters_cannot_reach_the_format() {
        assert_eq!(format_safe("key %s%n\0\n done"), "key %%s%%n\\x00\\x0a done");
    }
}
