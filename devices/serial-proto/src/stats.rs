//! Counters kept by both session halves, for metrics and the conformance report.

/// Running totals for one session object (across epochs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Valid frames received.
    pub frames_received: u64,
    /// Frames sent, retransmissions included.
    pub frames_sent: u64,
    /// Byte runs that were not valid frames (CRC, stuffing, length, oversize).
    pub frame_errors: u64,
    /// Valid frames whose body was malformed or of an unknown type.
    pub body_errors: u64,
    /// Frames of another session epoch, dropped.
    pub stale_frames: u64,
    /// Reliable frames that arrived again after they were accepted.
    pub duplicate_frames: u64,
    /// Reliable frames that arrived ahead of a gap.
    pub out_of_order_frames: u64,
    /// NAKs sent (host) or honoured (device).
    pub naks_sent: u64,
    /// Reliable frames sent again.
    pub retransmissions: u64,
    /// Key blocks whose check value did not match.
    pub kcv_mismatches: u64,
    /// Key blocks handed to the owner.
    pub blocks_delivered: u64,
    /// Key blocks received again after a re-handshake, not handed up twice.
    pub duplicate_blocks: u64,
    /// Key bytes handed to the owner.
    pub key_bytes_delivered: u64,
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Sessions lost.
    pub sessions_lost: u64,
    /// Boot announcements received.
    pub announces: u64,
}
