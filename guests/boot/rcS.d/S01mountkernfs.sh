#!/bin/sh
# Short-Description: kernel file systems
# Sourced by rc (a *.sh script): reads /etc/fstab, mounts nothing (it only says what it would do).
grep -v '^#' "$BOOT/etc/fstab" | while read dev mnt type opts dump pass; do
    [ -n "$dev" ] || continue
    case ,$opts, in
        *,noauto,*) echo "skip $mnt (noauto)"; continue ;;
    esac
    case $type in
        proc|sysfs|devpts|tmpfs) kind=virtual ;;
        swap) kind=swap ;;
        *) kind=disk ;;
    esac
    o=$(echo "$opts" | tr ',' ' ')
    printf '%-7s %-9s %-6s fsck pass %s, %s option(s): %s\n' "$kind" "$mnt" "$type" "$pass" "$(count $o)" "$o"
done
