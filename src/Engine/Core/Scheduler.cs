using LocalVllm.Engine.Execution;

namespace LocalVllm.Engine.Core;

/// <summary>One sequence's share of a step: compute <see cref="NumNewTokens"/> tokens starting at its computed count.</summary>
public readonly record struct ScheduledSequence(Sequence Sequence, int NumNewTokens)
{
    /// <summary>
    /// Speculative decoding: tokens proposed after the sequence's last one, computed in this step behind it (they are
    /// counted in <see cref="NumNewTokens"/>) and kept only as far as the model's own choices agree with them.
    /// </summary>
    public int[]? Drafts { get; init; }
}

/// <summary>
/// Token-level scheduling in the style of vLLM V1: each step spends a budget of <c>MaxNumBatchedTokens</c> on running
/// sequences first (decodes and the next chunk of long prompts), then admits waiting ones in arrival order. When blocks
/// run out, the most recently admitted running sequence is preempted: its blocks are freed and it is recomputed later.
/// With priority scheduling, waiting sequences are kept in order of (priority, arrival), the running sequence
/// preempted is the one last in that order (which may be one already given work this step: that work is undone), and
/// when every slot (<c>MaxNumSeqs</c>) is taken a strictly more urgent waiting sequence displaces that one.
/// </summary>
public sealed class Scheduler
{
    private readonly BlockManager _blocks;
    private readonly LinkedList<Sequence> _waiting = new();
    private readonly List<Sequence> _running = [];

    public Scheduler(BlockManager blocks, int maxNumBatchedTokens, int maxNumSeqs, bool deduplicateSharedPrefixes = false, bool cacheAwareOrdering = false,
        bool priorityScheduling = false)
    {
        PriorityScheduling = priorityScheduling;
        _blocks = blocks;
        MaxNumBatchedTokens = maxNumBatchedTokens;
        MaxNumSeqs = maxNumSeqs;
        DeduplicateSharedPrefixes = deduplicateSharedPrefixes;
        CacheAwareOrdering = cacheAwareOrdering;
    }

    /// <summary>The most distinct LoRA adapters among running sequences (vLLM's <c>max_loras</c>); a waiting request with another waits.</summary>
    public int MaxLoras { get; init; } = int.MaxValue;

    /// <summary>Waiting requests considered for admission each step.</summary>
    public const int AdmissionWindow = 64;
    /// <summary>How often a waiting request may be passed over (by cache-aware ordering or shared-head deferral) before it goes first.</summary>
    public const int MaxTimesPassedOver = 32;

    /// <summary>Order waiting sequences by (priority, arrival) and preempt the last of the running ones in that order.</summary>
    public bool PriorityScheduling { get; }

    /// <summary>Whether <paramref name="a"/> goes after <paramref name="b"/> in priority order (lower priority value first, then arrival).</summary>
    private static bool After(Sequence a, Sequence b) =>
        a.Sampling.Priority != b.Sampling.Priority ? a.Sampling.Priority > b.Sampling.Priority : a.ArrivalTicks > b.ArrivalTicks;

    /// <summary>Into the waiting line by priority: after every sequence it does not go before (so equals keep their order).</summary>
    private void InsertByPriority(Sequence seq)
    {
        var node = _waiting.Last;
        while (node is not null && After(node.Value, seq)) node = node.Previous;
        if (node is null) _waiting.AddFirst(seq); else _waiting.AddAfter(node, seq);
    }

    /// <summary>The running sequence to preempt: the latest admitted, or with priority scheduling the last in priority order.</summary>
    private Sequence Victim()
    {
        if (!PriorityScheduling) return _running[^1];
        var victim = _running[0];
        foreach (var s in _running)
            if (!After(victim, s)) victim = s; // the later of equals: the most recently admitted
        return victim;
    }

    /// <summary>
    /// Whether waiting <paramref name="seq"/> may take a running sequence's slot: only with priority scheduling, and only
    /// when strictly more urgent than the least urgent running one (equal priorities never displace each other, so
    /// nothing goes back and forth between two requests).
    /// </summary>
    private bool CanDisplace(Sequence seq) => PriorityScheduling && _running.Count > 0 && seq.Sampling.Priority < Victim().Sampling.Priority;

    /// <summary>
    /// Whether <paramref name="seq"/>'s next token and <paramref name="numDrafts"/> drafts fit in the free blocks with
    /// one block left for each of the <paramref name="othersAfter"/> running sequences still to be scheduled: drafts never
    /// take the block another sequence's next token needs (which would preempt it).
    /// </summary>
    private bool DraftsFit(Sequence seq, int numDrafts, int othersAfter)
    {
        int needed = Math.Max(0, _blocks.BlocksFor(seq.NumComputedTokens + 1 + numDrafts) - seq.BlockTable.Count);
        int forToken = Math.Max(0, _blocks.BlocksFor(seq.NumComputedTokens + 1) - seq.BlockTable.Count);
        return needed == forToken || _blocks.NumFreeBlocks - needed >= othersAfter;
    }

    /// <summary>Takes back the work <paramref name="seq"/> was given earlier in this step, if any (before it is preempted).</summary>
    private void Unschedule(Sequence seq, List<ScheduledSequence> scheduled, ref int budget)
    {
        int k = scheduled.FindIndex(x => x.Sequence == seq);
        if (k < 0) return;
        NumPreemptedAfterScheduling++;
        budget += scheduled[k].NumNewTokens;
        scheduled.RemoveAt(k);
    }

    /// <summary>Speculative decoding's draft proposer, or null when it is off.</summary>
    internal NgramProposer? Speculation { get; init; }

    /// <summary>Hold back a request whose next uncached block another request is computing in this step.</summary>
    public bool DeduplicateSharedPrefixes { get; }
    /// <summary>Admit waiting requests with longer cached prefixes first (bounded by <see cref="MaxTimesPassedOver"/>).</summary>
    public bool CacheAwareOrdering { get; }
    /// <summary>Times a request was held back because its head was being computed by another.</summary>
    public long NumDeferredForSharedPrefix { get; private set; }

    /// <summary>The cached leading blocks a waiting sequence may start from (none when it has prompt logprobs to compute).</summary>
    private IReadOnlyList<int> CachedHits(Sequence seq) =>
        seq.NumComputedTokens == 0 && seq.Sampling.PromptLogprobs is null ? _blocks.FindCachedPrefix(seq) : [];

    private HashSet<ulong> PendingBlockHashes()
    {
        var pending = new HashSet<ulong>();
        foreach (var seq in _running)
            for (int b = seq.NumComputedTokens / _blocks.BlockSize; b < seq.NumPromptTokens / _blocks.BlockSize && b < seq.BlockHashes.Count; b++)
                pending.Add(seq.BlockHashes[b]);
        return pending;
    }

    public int MaxNumBatchedTokens { get; }
    public int MaxNumSeqs { get; }
    public int NumWaiting => _waiting.Count;
    public int NumRunning => _running.Count;
    public bool HasUnfinished => _waiting.Count > 0 || _running.Count > 0;
    /// <summary>Prompt tokens of admitted sequences, and how many of them the prefix cache served.</summary>
    public long AdmittedPromptTokens { get; private set; }
    /// <summary>Prompt tokens served from the prefix cache at admission.</summary>
    public long CachedPromptTokens { get; private set; }
    /// <summary>Preemptions since start.</summary>
    public long NumPreemptions { get; private set; }
    /// <summary>Preemptions (priority scheduling) of a sequence already given work in the same step, whose work was undone.</summary>
    internal long NumPreemptedAfterScheduling { get; private set; }

    /// <summary>Queues a new sequence.</summary>
    public void Add(Sequence seq)
    {
        if (PriorityScheduling) InsertByPriority(seq);
        else _waiting.AddLast(seq);
    }

    /// <summary>Picks this step's work within the token budget.</summary>
    public List<ScheduledSequence> Schedule()
    {
        var scheduled = new List<ScheduledSequence>();
        int budget = MaxNumBatchedTokens;
        bool preempted = false;
        var speculation = Speculation is { } s && !s.DisabledFor(_running.Count) ? s : null;

        for (int i = 0; i < _running.Count && budget > 0;)
        {
            var seq = _running[i];
            int numNew = Math.Min(seq.NumTokens - seq.NumComputedTokens, budget);
            // Speculative decoding: a decoding sequence also computes draft tokens behind its last one, when the budget
            // and free blocks allow; nobody is preempted to make room for drafts.
            int[]? drafts = speculation is { } proposer && numNew == 1 && seq.NumTokens - seq.NumComputedTokens == 1 && budget > 1
                ? proposer.Propose(seq, budget - 1) : null;
            if (drafts is not null && DraftsFit(seq, drafts.Length, _running.Count - i - 1)) numNew += drafts.Length;
            else drafts = null;
            bool selfPreempted = false;
            while (!_blocks.CanAllocate(seq, [], seq.NumComputedTokens + numNew))
            {
                var victim = Victim();
                int at = _running.IndexOf(victim);
                Preempt(victim);
                preempted = true;
                if (victim == seq) { selfPreempted = true; break; }
                if (at < i)
                {
                    // Already given work this step (priority scheduling only): undo it, its blocks are freed.
                    Unschedule(victim, scheduled, ref budget);
                    i--;
                }
            }
            if (selfPreempted) continue; // the rest of the line (with priorities, more urgent ones may follow) still gets its turn
            _blocks.Allocate(seq, [], seq.NumComputedTokens + numNew);
            scheduled.Add(new ScheduledSequence(seq, numNew) { Drafts = drafts });
            budget -= numNew;
            i++;
        }

        if (preempted || budget <= 0 || _waiting.Count == 0 || (_running.Count >= MaxNumSeqs && !CanDisplace(_waiting.First!.Value))) return scheduled;

        // Hashes of uncached prompt blocks that sequences in prefill are computing right now: a waiting request whose
        // next block is among them waits a step and then finds the block cached, instead of computing it again.
        var pending = DeduplicateSharedPrefixes && _blocks.EnablePrefixCaching ? PendingBlockHashes() : null;
        var candidates = _waiting.Take(AdmissionWindow).ToList();
        if (CacheAwareOrdering && candidates.Count > 1 && candidates[0].TimesPassedOver < MaxTimesPassedOver)
            candidates = PriorityScheduling
                ? candidates.OrderBy(seq => seq.Sampling.Priority).ThenByDescending(seq => CachedHits(seq).Count).ToList() // within a priority only
                : candidates.OrderByDescending(seq => CachedHits(seq).Count).ToList(); // stable: arrival order among equals

        bool admittedAny = false;
        var adapters = _running.Where(s => s.Lora is not null).Select(s => s.Lora!).ToHashSet();
        foreach (var seq in candidates)
        {
            // A request under an adapter that is not running waits while MaxLoras adapters are (vLLM's max_loras).
            if (seq.Lora is { } adapter && !adapters.Contains(adapter) && adapters.Count >= MaxLoras) continue;
            bool full = _running.Count >= MaxNumSeqs;
            if (full && !CanDisplace(seq)) break; // all slots taken, and (without a more urgent request) nobody else gets in
            // Looked up here, not reused from the ordering: admitting an earlier candidate may have evicted blocks.
            var hits = CachedHits(seq);
            bool deferred = pending is not null && seq.BlockHashes.Count > hits.Count && pending.Contains(seq.BlockHashes[hits.Count])
                && seq.TimesDeferred < MaxTimesPassedOver;
            if (full && !deferred)
            {
                // Priority scheduling, all slots taken: a strictly more urgent request takes the least urgent one's slot
                // (that one goes back to wait, its work for this step undone). Not for a request held back below: it
                // would leave the slot empty this step.
                var victim = Victim();
                Unschedule(victim, scheduled, ref budget);
                Preempt(victim);
                hits = CachedHits(seq);
            }
            if (budget <= 0) break;
            if (deferred)
            {
                seq.TimesDeferred++;
                NumDeferredForSharedPrefix++;
                continue;
            }
            int computed = hits.Count * _blocks.BlockSize;
            int numNew = Math.Min(seq.NumTokens - computed, budget);
            if (!_blocks.CanAllocate(seq, hits, computed + numNew)) break; // out of blocks: admit nobody else this step
            _blocks.Allocate(seq, hits, computed + numNew);
            seq.FirstScheduledTicks ??= System.Diagnostics.Stopwatch.GetTimestamp();
            if (seq.NumOutputTokens == 0 && seq.NumCachedPromptTokens == 0)
            {
                seq.NumCachedPromptTokens = computed;
                CachedPromptTokens += computed;
                AdmittedPromptTokens += seq.NumPromptTokens;
            }
            seq.NumComputedTokens = computed;
            seq.Status = SequenceStatus.Running;
            _waiting.Remove(seq);
            _running.Add(seq);
            if (seq.Lora is not null) adapters.Add(seq.Lora);
            scheduled.Add(new ScheduledSequence(seq, numNew));
            budget -= numNew;
            admittedAny = true;
            if (pending is not null)
                for (int b = seq.NumComputedTokens / _blocks.BlockSize; b < seq.NumPromptTokens / _blocks.BlockSize && b < seq.BlockHashes.Count; b++)
                    pending.Add(seq.BlockHashes[b]);
        }
        if (admittedAny && _waiting.First is { } head) head.Value.TimesPassedOver++; // someone was admitted while it waited
        return scheduled;
    }

    /// <summary>
    /// Applies a step's results: each scheduled sequence's computed-token count moves on by the tokens it computed,
    /// its newly full blocks enter the prefix cache, and each sequence that sampled gets its token appended. Returns
    /// the prefill and decode tokens the step computed.
    /// </summary>
    public (int Prefill, int Decode) Update(IReadOnlyList<ScheduledSequence> batch, IReadOnlyList<SampledToken?> sampled, IReadOnlyList<int>?[]? accepted = null)
    {
        int prefill = 0, decode = 0;
        for (int i = 0; i < batch.Count; i++)
        {
            var (seq, numNew) = batch[i];
            bool inPrefill = seq.NumComputedTokens < seq.NumPromptTokens;
            int stands = numNew;
            if (batch[i].Drafts is { } drafts)
            {
                // Speculative decoding: the K/V of the last token and of the drafts the model agreed with stand; those of
                // the rejected drafts are left in their slots, to be overwritten when those positions are computed.
                var kept = accepted?[i] ?? [];
                foreach (int t in kept) seq.Append(t);
                stands = 1 + kept.Count;
                NumDraftTokens += drafts.Length;
                NumAcceptedDraftTokens += kept.Count;
            }
            seq.NumComputedTokens += stands;
            // Decode tokens count what stands (the generation-token metric must not count rejected drafts).
            if (inPrefill) prefill += numNew; else decode += stands;
            _blocks.CacheFullBlocks(seq);
            if (sampled[i] is { } token) seq.Append(token.TokenId);
        }
        return (prefill, decode);
    }

    /// <summary>Speculative decoding: draft tokens computed, and those the model's own choices agreed with.</summary>
    public long NumDraftTokens { get; private set; }
    public long NumAcceptedDraftTokens { get; private set; }

    /// <summary>Removes a finished or aborted sequence and releases its blocks.</summary>
    public void Finish(Sequence seq, string reason, object? stopReason = null)
    {
        seq.FinishReason = reason;
        seq.StopReason = stopReason;
        seq.Status = SequenceStatus.Finished;
        if (!_running.Remove(seq)) _waiting.Remove(seq);
        _blocks.Free(seq);
    }

    /// <summary>The sequences not yet finished (running first, then waiting).</summary>
    public IEnumerable<Sequence> Unfinished => _running.Concat(_waiting);

    private void Preempt(Sequence seq)
    {
        _running.Remove(seq);
        _blocks.Free(seq);
        seq.NumComputedTokens = 0;
        seq.Status = SequenceStatus.Waiting;
        if (PriorityScheduling) InsertByPriority(seq);
        else _waiting.AddFirst(seq);
        NumPreemptions++;
    }
}
