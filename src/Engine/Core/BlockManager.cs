using System.IO.Hashing;
using System.Runtime.InteropServices;

namespace LocalVllm.Engine.Core;

/// <summary>
/// Hands out KV blocks, shares them by reference count, and keeps full blocks findable by a chained hash so that
/// identical prompt prefixes are computed once (automatic prefix caching). A block with reference count zero stays
/// in the cache until it is needed for something else. Eviction knows what is shared: blocks that two or more
/// sequences have used (system prompts, tool lists, documents) sit in a second free list that is only drawn on when
/// the first (private tails, never-cached blocks) is empty; within each list the least recently used goes first.
/// Every operation is O(1) per block. Pinned blocks hold a reference of their own and are never evicted.
/// </summary>
public sealed class BlockManager
{
    private sealed class Block(int id)
    {
        public readonly int Id = id;
        public int RefCount;
        public ulong? Hash;
        public int[]? Tokens;
        public LinkedListNode<Block>? FreeNode;
        /// <summary>Sequences that have held this block since it was last filled.</summary>
        public int Users;
        /// <summary>References held by pins.</summary>
        public int Pins;
    }

    private readonly Block[] _blocks;
    private readonly LinkedList<Block> _freePrivate = new(); // evicted first, least recently used at the front
    private readonly LinkedList<Block> _freeShared = new(); // blocks used by two or more sequences
    private readonly Dictionary<ulong, Block> _cached = [];
    private readonly ulong _salt;
    private int _cachedFree;

    /// <summary>Creates a pool of <paramref name="numBlocks"/> blocks of <paramref name="blockSize"/> tokens.</summary>
    public BlockManager(int numBlocks, int blockSize, bool enablePrefixCaching, ulong salt, bool sharedAwareEviction = false)
    {
        BlockSize = blockSize;
        EnablePrefixCaching = enablePrefixCaching;
        SharedAwareEviction = sharedAwareEviction;
        _salt = salt;
        _blocks = new Block[numBlocks];
        for (int i = 0; i < numBlocks; i++)
        {
            _blocks[i] = new Block(i);
            _blocks[i].FreeNode = _freePrivate.AddLast(_blocks[i]);
        }
    }

    public int BlockSize { get; }
    public bool EnablePrefixCaching { get; }
    /// <summary>Keep blocks that several sequences used over private ones when evicting.</summary>
    public bool SharedAwareEviction { get; }
    public int NumBlocks => _blocks.Length;
    /// <summary>Blocks with reference count zero (free or cached-and-evictable).</summary>
    public int NumFreeBlocks => _freePrivate.Count + _freeShared.Count;
    /// <summary>Blocks with reference count zero that still hold a cached prefix.</summary>
    public int NumCachedFreeBlocks => _cachedFree;
    /// <summary>Blocks owned by at least one sequence or pin.</summary>
    public int NumUsedBlocks => _blocks.Length - NumFreeBlocks;
    /// <summary>Blocks held by pins.</summary>
    public int NumPinnedBlocks { get; private set; }
    /// <summary>Cached blocks evicted to make room since start.</summary>
    public long NumEvictions { get; private set; }

    /// <summary>Blocks needed to hold <paramref name="numTokens"/> tokens.</summary>
    public int BlocksFor(int numTokens) => (numTokens + BlockSize - 1) / BlockSize;

    /// <summary>
    /// The longest run of <paramref name="seq"/>'s leading full blocks found in the cache, confirmed token by token,
    /// leaving at least the last known token to compute. Nothing is allocated.
    /// </summary>
    public IReadOnlyList<int> FindCachedPrefix(Sequence seq)
    {
        if (!EnablePrefixCaching) return [];
        ExtendHashes(seq);
        int maxBlocks = (seq.NumTokens - 1) / BlockSize;
        var hits = new List<int>();
        for (int i = 0; i < maxBlocks && i < seq.BlockHashes.Count; i++)
        {
            if (!_cached.TryGetValue(seq.BlockHashes[i], out var block)) break;
            if (!TokensEqual(block.Tokens!, seq, i)) break;
            hits.Add(block.Id);
        }
        return hits;
    }

    /// <summary>Whether <paramref name="seq"/> (holding <paramref name="hits"/> first) can grow to <paramref name="numTokens"/> tokens.</summary>
    public bool CanAllocate(Sequence seq, IReadOnlyList<int> hits, int numTokens)
    {
        int needed = BlocksFor(numTokens) - seq.BlockTable.Count - hits.Count;
        int hitsFromFree = 0;
        foreach (var id in hits) if (_blocks[id].RefCount == 0) hitsFromFree++;
        return needed <= NumFreeBlocks - hitsFromFree;
    }

    /// <summary>Takes <paramref name="hits"/> (shared) and fresh blocks so that <paramref name="seq"/> holds <paramref name="numTokens"/> tokens.</summary>
    public void Allocate(Sequence seq, IReadOnlyList<int> hits, int numTokens)
    {
        if (!CanAllocate(seq, hits, numTokens))
            throw new InvalidOperationException($"Not enough free KV blocks for sequence {seq.RequestId}.");
        foreach (var id in hits)
        {
            var b = _blocks[id];
            if (b.RefCount++ == 0) RemoveFromFree(b);
            b.Users++;
            seq.BlockTable.Add(id);
        }
        if (hits.Count > 0) seq.NumRegisteredBlocks = seq.BlockTable.Count;
        while (seq.BlockTable.Count < BlocksFor(numTokens))
        {
            var b = (_freePrivate.First ?? _freeShared.First)!.Value;
            RemoveFromFree(b);
            if (b.Hash is ulong h)
            {
                _cached.Remove(h);
                NumEvictions++;
            }
            b.Hash = null;
            b.Tokens = null;
            b.RefCount = 1;
            b.Users = 1;
            seq.BlockTable.Add(b.Id);
        }
    }

    /// <summary>Registers <paramref name="seq"/>'s newly computed full blocks in the prefix cache.</summary>
    public void CacheFullBlocks(Sequence seq)
    {
        if (!EnablePrefixCaching) return;
        int full = Math.Min(seq.NumComputedTokens / BlockSize, seq.BlockTable.Count);
        if (full <= seq.NumRegisteredBlocks) return;
        ExtendHashes(seq);
        for (int i = seq.NumRegisteredBlocks; i < full; i++)
        {
            var b = _blocks[seq.BlockTable[i]];
            if (b.Hash is not null) continue;
            ulong h = seq.BlockHashes[i];
            if (_cached.ContainsKey(h)) continue; // computed twice in one step: keep the first copy
            b.Hash = h;
            b.Tokens = CollectionsMarshal.AsSpan(seq.TokenList).Slice(i * BlockSize, BlockSize).ToArray();
            _cached[h] = b;
        }
        seq.NumRegisteredBlocks = full;
    }

    /// <summary>Releases <paramref name="seq"/>'s blocks; cached ones stay findable, tail blocks are evicted first.</summary>
    public void Free(Sequence seq)
    {
        for (int i = seq.BlockTable.Count - 1; i >= 0; i--)
        {
            var b = _blocks[seq.BlockTable[i]];
            if (--b.RefCount > 0) continue;
            if (b.RefCount < 0) throw new InvalidOperationException($"Block {b.Id} freed twice.");
            Release(b);
        }
        seq.BlockTable.Clear();
        seq.NumRegisteredBlocks = 0;
    }

    /// <summary>Holds an extra reference on each of <paramref name="blockIds"/> so they are never evicted.</summary>
    public void Pin(IEnumerable<int> blockIds)
    {
        foreach (var id in blockIds)
        {
            var b = _blocks[id];
            if (b.Hash is null) throw new InvalidOperationException($"Block {id} holds no cached prefix and cannot be pinned.");
            if (b.RefCount++ == 0) RemoveFromFree(b);
            if (b.Pins++ == 0) NumPinnedBlocks++;
        }
    }

    /// <summary>Releases pins taken by <see cref="Pin"/>; the blocks stay cached until evicted.</summary>
    public void Unpin(IEnumerable<int> blockIds)
    {
        foreach (var id in blockIds)
        {
            var b = _blocks[id];
            if (b.Pins == 0) throw new InvalidOperationException($"Block {id} is not pinned.");
            if (--b.Pins == 0) NumPinnedBlocks--;
            if (--b.RefCount == 0) Release(b);
        }
    }

    /// <summary>The cached blocks holding <paramref name="tokens"/>'s full leading blocks (for pinning).</summary>
    public IReadOnlyList<int> CachedBlocksOf(IReadOnlyList<int> tokens)
    {
        var probe = new Sequence("probe", 0, [.. tokens, 0], new SamplingParams(), 0);
        return FindCachedPrefix(probe);
    }

    private void Release(Block b)
    {
        if (b.Hash is null) b.FreeNode = _freePrivate.AddFirst(b);
        else
        {
            _cachedFree++;
            b.FreeNode = SharedAwareEviction && b.Users >= 2 ? _freeShared.AddLast(b) : _freePrivate.AddLast(b);
        }
    }

    /// <summary>
    /// Test hook: maps every chained block hash before use (a function that folds hashes together forces collisions,
    /// which the token comparison on every hit must then catch). Null in production.
    /// </summary>
    internal Func<ulong, ulong>? HashTransform { get; set; }

    /// <summary>
    /// Throws if the bookkeeping is inconsistent with <paramref name="holders"/>, the sequences that hold blocks now:
    /// every block's reference count is its holders' references plus its pins, and every cached block a holder
    /// holds carries exactly the holder's tokens for that position (no request ever reads another's KV).
    /// </summary>
    public void CheckInvariants(IEnumerable<Sequence> holders)
    {
        CheckInvariants(expectAllFree: false);
        var refs = new int[_blocks.Length];
        foreach (var seq in holders)
            for (int i = 0; i < seq.BlockTable.Count; i++)
            {
                var b = _blocks[seq.BlockTable[i]];
                refs[b.Id]++;
                if (b.Tokens is { } cached && !TokensEqual(cached, seq, i))
                    throw new InvalidOperationException($"Block {b.Id} at position {i} of sequence {seq.RequestId}/{seq.Index} holds other tokens than the sequence.");
            }
        foreach (var b in _blocks)
            if (b.RefCount != refs[b.Id] + b.Pins)
                throw new InvalidOperationException($"Block {b.Id} has reference count {b.RefCount} but {refs[b.Id]} holders and {b.Pins} pins.");
    }

    /// <summary>Throws if the pool's bookkeeping is inconsistent; used by tests after every request.</summary>
    public void CheckInvariants(bool expectAllFree)
    {
        int free = 0;
        foreach (var b in _blocks)
        {
            if (b.RefCount < 0) throw new InvalidOperationException($"Block {b.Id} has reference count {b.RefCount}.");
            if ((b.RefCount == 0) != (b.FreeNode is not null))
                throw new InvalidOperationException($"Block {b.Id} (ref {b.RefCount}) is {(b.FreeNode is null ? "not " : "")}in the free list.");
            if (b.RefCount == 0) free++;
            if (expectAllFree && b.RefCount != b.Pins) throw new InvalidOperationException($"Block {b.Id} leaked with reference count {b.RefCount} ({b.Pins} pins).");
            if (b.Hash is ulong h && (!_cached.TryGetValue(h, out var c) || c != b))
                throw new InvalidOperationException($"Block {b.Id} has a hash that the cache does not map to it.");
        }
        if (free != NumFreeBlocks) throw new InvalidOperationException($"Free lists hold {NumFreeBlocks} blocks but {free} have reference count 0.");
        if (_cachedFree != _blocks.Count(b => b.RefCount == 0 && b.Hash is not null)) throw new InvalidOperationException("Cached-free count is off.");
        if (NumUsedBlocks + NumFreeBlocks != NumBlocks) throw new InvalidOperationException("used + free != total.");
    }

    private void RemoveFromFree(Block b)
    {
        b.FreeNode!.List!.Remove(b.FreeNode);
        b.FreeNode = null;
        if (b.Hash is not null) _cachedFree--;
    }

    private void ExtendHashes(Sequence seq)
    {
        var tokens = seq.TokenList;
        int full = seq.NumTokens / BlockSize;
        Span<byte> parent = stackalloc byte[8];
        for (int i = seq.BlockHashes.Count; i < full; i++)
        {
            ulong parentHash = i == 0 ? _salt ^ seq.PrefixSalt : seq.BlockHashes[i - 1];
            var hasher = new XxHash64(unchecked((long)_salt));
            BitConverter.TryWriteBytes(parent, parentHash);
            hasher.Append(parent);
            hasher.Append(MemoryMarshal.AsBytes(CollectionsMarshal.AsSpan(tokens).Slice(i * BlockSize, BlockSize)));
            ulong hash = hasher.GetCurrentHashAsUInt64();
            seq.BlockHashes.Add(HashTransform is { } transform ? transform(hash) : hash);
        }
    }

    private bool TokensEqual(int[] cached, Sequence seq, int blockIndex)
    {
        var tokens = CollectionsMarshal.AsSpan(seq.TokenList).Slice(blockIndex * BlockSize, BlockSize);
        return tokens.SequenceEqual(cached);
    }
}
